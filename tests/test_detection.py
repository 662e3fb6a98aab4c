"""Curvature-asymmetry detection: exact second differences, the sign flip, ROC metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from curvature_cases import digits_curvature, quadratic_classifier
from helpers import tol

import bgeom
from bgeom import curvature, detection


@pytest.fixture(scope="module")
def quadratic():
    apply_fn, params = quadratic_classifier(2, 4, scale=0.5)
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, 4, 1))
    basis = _random_basis(3, 5)
    dirs = detection.curved_directions(jax.random.PRNGKey(4), basis, 16, 0.3)
    return apply_fn, params, x, dirs


def _random_basis(seed, m, shape=(4, 4, 1)):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((int(np.prod(shape)), m)))
    return jnp.asarray(q.T.reshape(m, *shape), jnp.float32)


def test_directions_lie_in_the_subspace_with_the_given_norm():
    basis = _random_basis(0, 3)
    v = detection.curved_directions(jax.random.PRNGKey(1), basis, 10, 0.7)
    assert v.shape == (10, 4, 4, 1)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(v).reshape(10, -1), axis=1), 0.7, rtol=1e-5
    )
    for vi in v:  # inside S: the projection keeps all of it
        np.testing.assert_allclose(float(curvature.projection_ratio(vi, basis)), 1.0, rtol=1e-5)


def test_scores_are_exact_second_differences_on_a_quadratic(quadratic):
    apply_fn, params, x, dirs = quadratic
    res = detection.asymmetry_score(apply_fn, params, x, dirs)
    A = np.asarray(params[0], np.float64)
    k0 = int(jnp.argmax(apply_fn(params, x)))
    assert int(res.label) == k0
    V = np.asarray(dirs, np.float64).reshape(len(dirs), -1)
    # F(x + v) + F(x - v) - 2 F(x) = v^T H_F v exactly for a quadratic F.
    expected = np.array([np.mean(np.einsum("ti,ij,tj->t", V, A[k] - A[k0], V)) for k in range(4)])
    expected[k0] = np.inf
    np.testing.assert_allclose(np.asarray(res.scores), expected, atol=1e-4, rtol=1e-4)
    finite = np.where(np.isinf(expected), np.inf, expected)
    assert int(res.recovered_label) == int(np.argmin(finite))
    np.testing.assert_allclose(float(res.score), -np.min(finite), atol=1e-4, rtol=1e-4)


def test_sign_flips_across_the_boundary(quadratic):
    """rho_{k0}(x + r) = -rho_j(x): the two sides see the boundary bend opposite ways."""
    apply_fn, params, x, dirs = quadratic
    df = bgeom.deepfool(apply_fn, params, x)
    assert bool(df.converged)
    k0, j = int(df.label), int(df.adv_label)
    clean = detection.asymmetry_score(apply_fn, params, x, dirs)
    pert = detection.asymmetry_score(apply_fn, params, x + df.perturbation, dirs)
    assert int(pert.label) == j
    np.testing.assert_allclose(
        float(pert.scores[k0]), -float(clean.scores[j]), **tol(jnp.float32, 64)
    )
    # With two classes the detection score itself flips sign.
    f2 = lambda p, z: apply_fn(p, z)[jnp.asarray([k0, j])]
    c2 = detection.asymmetry_score(f2, params, x, dirs)
    p2 = detection.asymmetry_score(f2, params, x + df.perturbation, dirs)
    np.testing.assert_allclose(float(p2.score), -float(c2.score), **tol(jnp.float32, 64))
    assert int(p2.recovered_label) == 0  # the original class (index 0 of the pair)


def test_threshold_roc_and_recovery_by_hand():
    clean = np.array([0.0, 1.0, 2.0, 3.0])
    perturbed = np.array([1.5, 4.0])
    fpr, tpr, auc = detection.roc(clean, perturbed)
    # Pairs (perturbed > clean): 1.5 beats 0 and 1; 4.0 beats all four -> 6 of 8.
    assert auc == pytest.approx(6 / 8)
    assert fpr[0] == 0.0 and fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert detection.roc([0.0, 1.0], [2.0, 3.0])[2] == 1.0
    assert detection.roc([1.0, 1.0], [1.0])[2] == 0.5  # ties count one half
    thr = detection.fit_threshold(np.arange(100.0), false_positive_rate=0.1)
    assert np.mean(np.arange(100.0) > thr) <= 0.1
    assert thr == 90.0
    assert detection.recovery_accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    assert detection.recovery_accuracy([1, 2, 3], [1, 0, 3], flagged=[True, True, False]) == 0.5
    assert np.isnan(detection.recovery_accuracy([1], [1], flagged=[False]))
    with pytest.raises(ValueError, match="false_positive_rate"):
        detection.fit_threshold([1.0], 1.5)


def test_misuse_raises(quadratic):
    apply_fn, params, x, dirs = quadratic
    with pytest.raises(ValueError, match="curved_directions"):
        detection.asymmetry_score(apply_fn, params, x, dirs[0])
    with pytest.raises(ValueError, match="jax.vmap"):
        detection.asymmetry_score(apply_fn, params, jnp.stack([x, x]), dirs)
    with pytest.raises(ValueError, match="radius"):
        detection.curved_directions(jax.random.PRNGKey(0), _random_basis(0, 3), 4, 0.0)


def test_non_finite_logits_are_not_a_score(quadratic):
    apply_fn, params, x, dirs = quadratic
    score = jax.jit(lambda z: detection.asymmetry_score(apply_fn, params, z, dirs))
    assert bool(score(x).converged)
    assert not bool(score(x.at[0, 0, 0].set(jnp.nan)).converged)


def test_digits_detection_and_label_recovery():
    """The whole pipeline on a trained smooth MLP: S from held-out points, a threshold from
    held-out clean scores, and recovered labels of perturbed inputs well above chance.

    The AUC itself is only checked to be a probability: on this small MLP it is below
    0.5 (clean and perturbed scores overlap); the suite probe reports it per model."""
    facts = digits_curvature()
    apply_fn, params = facts.apply_fn, facts.params
    held_out = facts.x_train
    radius = float(
        np.median(np.linalg.norm((facts.train.boundary_point - held_out).reshape(32, -1), axis=1))
    )
    dirs = detection.curved_directions(jax.random.PRNGKey(0), facts.shared.basis, 32, radius)
    score = jax.jit(jax.vmap(lambda x: detection.asymmetry_score(apply_fn, params, x, dirs)))
    # Minimal perturbations: 2 % past the refined boundary point of each test image.
    x = facts.x_test
    adv = x + 1.02 * (facts.test.boundary_point - x)
    clean, pert = score(x), score(adv)
    ok = np.asarray(pert.label) == np.asarray(facts.test.adv_label)
    assert ok.mean() > 0.9
    thr = detection.fit_threshold(score(held_out).score, 0.1)
    _, _, auc = detection.roc(clean.score, np.asarray(pert.score)[ok])
    acc = detection.recovery_accuracy(
        np.asarray(pert.recovered_label)[ok], np.asarray(facts.test.label)[ok]
    )
    assert 0.0 <= auc <= 1.0 and np.isfinite(thr)
    assert np.mean(np.asarray(score(held_out).score) > thr) <= 0.1
    assert acc > 2 / 9  # chance is 1/9 (nine competitors); measured 0.31
