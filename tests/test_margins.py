"""DeepFool against closed-form answers (affine classifiers) and on a trained CNN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import affine_classifier, affine_margin, tol
from hypothesis import given, settings
from hypothesis import strategies as st

import bgeom


@pytest.mark.parametrize("num_classes,candidates", [(2, 10), (5, 10), (10, 10), (10, 3)])
def test_affine_margin_is_closed_form(num_classes, candidates):
    apply_fn, params = affine_classifier(num_classes, num_classes)
    x = jax.random.uniform(jax.random.PRNGKey(num_classes), (4, 4, 1))
    res = bgeom.deepfool(apply_fn, params, x, candidates=candidates)
    expected, adv = affine_margin(params, x, min(candidates, num_classes), 0.02)
    assert bool(res.converged)
    assert int(res.iterations) == 1  # the linearisation is exact
    np.testing.assert_allclose(float(res.margin), expected, **tol(jnp.float32, 4))
    assert int(res.adv_label) == adv
    # The returned perturbation flips the label of the model itself.
    logits = apply_fn(params, x + res.perturbation)
    assert int(jnp.argmax(logits)) == adv != int(res.label)
    # It is parallel to w_adv - w_label.
    W = params[0]
    w = W[adv] - W[int(res.label)]
    cos = jnp.dot(res.perturbation.ravel(), w) / (jnp.linalg.norm(w) * res.margin)
    np.testing.assert_allclose(float(cos), 1.0, **tol(jnp.float32, 4))


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_classes=st.integers(2, 12),
    overshoot=st.floats(0.0, 0.5),
)
def test_affine_property(seed, num_classes, overshoot):
    apply_fn, params = affine_classifier(seed, num_classes, shape=(3, 3, 2))
    x = jax.random.normal(jax.random.PRNGKey(seed), (3, 3, 2))
    res = bgeom.deepfool(apply_fn, params, x, overshoot=overshoot)
    expected, adv = affine_margin(params, x, num_classes, overshoot)
    np.testing.assert_allclose(float(res.margin), expected, **tol(jnp.float32, 16))
    assert int(res.adv_label) == adv


def test_max_iter_zero_is_not_a_margin():
    apply_fn, params = affine_classifier(0, 5)
    x = jnp.full((4, 4, 1), 0.5)
    res = bgeom.deepfool(apply_fn, params, x, max_iter=0)
    assert not bool(res.converged)
    assert np.isinf(float(res.margin))
    assert int(res.iterations) == 0


def test_bounds_keep_the_point_in_the_box(digits_cnn, digits):
    x = jnp.asarray(digits.x_test[0])
    res = bgeom.deepfool(digits_cnn.apply_fn, digits_cnn.params, x, bounds=(0.0, 1.0))
    adv = x + res.perturbation
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert bool(res.converged)


def test_trained_cnn_margins_flip_every_label(digits_cnn, digits):
    apply_fn, params = digits_cnn.apply_fn, digits_cnn.params
    x = jnp.asarray(digits.x_test[:64])
    res = jax.jit(jax.vmap(lambda xi: bgeom.deepfool(apply_fn, params, xi)))(x)
    assert bool(jnp.all(res.converged))
    preds = jax.vmap(apply_fn, in_axes=(None, 0))(params, x + res.perturbation).argmax(-1)
    np.testing.assert_array_equal(np.asarray(preds), np.asarray(res.adv_label))
    assert bool(jnp.all(res.adv_label != res.label))
    clean = jax.vmap(apply_fn, in_axes=(None, 0))(params, x).argmax(-1)
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(res.label))
    # Minimality, loosely: a third of the perturbation never flips the label.
    small = jax.vmap(apply_fn, in_axes=(None, 0))(params, x + res.perturbation / 3).argmax(-1)
    assert float(jnp.mean(small == res.label)) > 0.9
    margins = np.asarray(res.margin)
    assert np.all(np.isfinite(margins)) and np.all(margins > 0)


# ---------------------------------------------------------------- bad input


def test_batch_passed_as_one_example_is_rejected():
    apply_fn, params = affine_classifier(0, 3)
    with pytest.raises(ValueError, match="ONE example"):
        bgeom.deepfool(apply_fn, params, jnp.zeros((2, 4, 4, 1)))


def test_nan_input_is_rejected_eagerly_and_not_converged_under_jit():
    apply_fn, params = affine_classifier(0, 3)
    x = jnp.full((4, 4, 1), jnp.nan)
    with pytest.raises(ValueError, match="NaN"):
        bgeom.deepfool(apply_fn, params, x)
    res = jax.jit(lambda z: bgeom.deepfool(apply_fn, params, z))(x)
    assert not bool(res.converged) and np.isinf(float(res.margin))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_iter": -1}, "max_iter"),
        ({"candidates": 1}, "candidates"),
        ({"overshoot": -0.1}, "overshoot"),
        ({"bounds": (1.0, 0.0)}, "bounds"),
    ],
)
def test_bad_options(kwargs, match):
    apply_fn, params = affine_classifier(0, 3)
    with pytest.raises(ValueError, match=match):
        bgeom.deepfool(apply_fn, params, jnp.zeros((4, 4, 1)), **kwargs)


def test_batched_apply_fn_is_rejected():
    W = jnp.ones((3, 16))
    batched = lambda p, x: x.reshape(-1, 16) @ p.T  # returns (1, 3) for one example
    with pytest.raises(ValueError, match="1-D vector of logits"):
        bgeom.deepfool(batched, W, jnp.zeros((4, 4, 1)))


def test_integer_image_is_rejected():
    apply_fn, params = affine_classifier(0, 3)
    with pytest.raises(ValueError, match="floating-point"):
        bgeom.deepfool(apply_fn, params, jnp.zeros((4, 4, 1), jnp.int32))


# ---------------------------------------------------------- targeted DeepFool


# One affine model for every targeted case (params traced: shared compilations).
AFFINE, _ = affine_classifier(0, 5)


@pytest.mark.parametrize("overshoot", [0.02, 0.1])
def test_targeted_deepfool_towards_the_nearest_class_is_deepfool(overshoot):
    _, params = affine_classifier(5, 5)
    x = jax.random.uniform(jax.random.PRNGKey(5), (4, 4, 1))
    expected, nearest = affine_margin(params, x, 5, overshoot)
    res = bgeom.targeted_deepfool(AFFINE, params, x, nearest, overshoot=overshoot)
    df = bgeom.deepfool(AFFINE, params, x, overshoot=overshoot)
    assert bool(res.converged) and int(res.adv_label) == nearest and int(res.iterations) == 1
    np.testing.assert_allclose(float(res.margin), expected, **tol(jnp.float32, 4))
    np.testing.assert_allclose(
        np.asarray(res.perturbation), np.asarray(df.perturbation), **tol(jnp.float32, 4)
    )


def test_targeted_deepfool_reaches_every_class_of_an_affine_classifier():
    _, params = affine_classifier(7, 5)
    x = jax.random.uniform(jax.random.PRNGKey(7), (4, 4, 1))
    label = int(jnp.argmax(AFFINE(params, x)))
    targets = jnp.arange(5)
    res = jax.vmap(lambda t: bgeom.targeted_deepfool(AFFINE, params, x, t))(targets)
    assert bool(jnp.all(res.converged))
    np.testing.assert_array_equal(np.asarray(res.adv_label), np.arange(5))
    reached = jax.vmap(lambda r: jnp.argmax(AFFINE(params, x + r)))(res.perturbation)
    np.testing.assert_array_equal(np.asarray(reached), np.arange(5))
    # Reaching a class is never cheaper than the nearest boundary (DeepFool's margin).
    df = bgeom.deepfool(AFFINE, params, x)
    others = np.delete(np.asarray(res.margin), label)
    assert np.all(others >= float(df.margin) * (1 - 1e-5))
    # Already there: nothing to do.
    assert float(res.margin[label]) == 0.0 and int(res.iterations[label]) == 0


def test_targeted_deepfool_without_iterations_is_not_a_margin():
    _, params = affine_classifier(0, 5)
    x = jnp.full((4, 4, 1), 0.5)
    target = (int(jnp.argmax(AFFINE(params, x))) + 1) % 5
    res = bgeom.targeted_deepfool(AFFINE, params, x, target, max_iter=0)
    assert not bool(res.converged) and np.isinf(float(res.margin))


@pytest.mark.parametrize(
    "target,match",
    [
        (7, r"in \[0, 5\)"),
        (-1, r"in \[0, 5\)"),
        (1.5, "integer"),
        (jnp.array([0, 1]), "ONE integer"),
    ],
)
def test_targeted_deepfool_bad_target(target, match):
    _, params = affine_classifier(0, 5)
    with pytest.raises(ValueError, match=match):
        bgeom.targeted_deepfool(AFFINE, params, jnp.zeros((4, 4, 1)), target)


def test_a_subspace_the_classifier_ignores_is_zero_gradient_not_a_margin():
    # The classifier reads only the first 8 pixels; the subspace spans the last 8.
    W = np.zeros((3, 16), np.float32)
    W[:, :8] = np.random.default_rng(0).standard_normal((3, 8))
    params = (jnp.asarray(W), jnp.asarray([0.1, 0.0, -0.1], jnp.float32))
    apply_fn = lambda p, x: p[0] @ x.ravel() + p[1]
    basis = np.eye(16, dtype=np.float32)[8:].reshape(8, 4, 4, 1)
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 4, 1))
    res = bgeom.subspace_deepfool(apply_fn, params, x, bgeom.subspaces.from_basis(basis))
    assert not bool(res.converged) and np.isinf(float(res.margin))
    assert bgeom.margins.STATUS_NAMES[int(res.status)] == "zero_gradient"
    assert int(res.iterations) == 1
    # The same model along the pixels it reads: an ordinary margin.
    seen = np.eye(16, dtype=np.float32)[:8].reshape(8, 4, 4, 1)
    res = bgeom.subspace_deepfool(apply_fn, params, x, bgeom.subspaces.from_basis(seen))
    assert bool(res.converged) and bgeom.margins.STATUS_NAMES[int(res.status)] == "converged"
