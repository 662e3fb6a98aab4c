"""SparseFool: the vectorised solver against the greedy loop, affine cases, the box, digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import affine_classifier

import bgeom
from bgeom import sparse


def greedy_loop(x, w, x_b, lb, ub):
    """SparseFool's linear solver as the authors' loop runs it (float64 NumPy)."""
    x, w, x_b = (np.asarray(a, np.float64).ravel().copy() for a in (x, w, x_b))
    lb, ub = (np.broadcast_to(np.asarray(b, np.float64), x.shape) for b in (lb, ub))
    left = w.copy()
    sign = np.sign(w @ (x - x_b))
    beta, current = 0.001 * sign, sign
    while current == sign and np.count_nonzero(left):
        f = w @ (x - x_b) + beta
        j = int(np.argmax(np.abs(left)))
        step = max(abs(f) / abs(left[j]), 1e-4) * np.sign(left[j])
        x[j] = np.clip(x[j] + step, lb[j], ub[j])
        current = np.sign(w @ (x - x_b))
        left[j] = 0.0
    return x


def _case(seed, d=40, reach=1.0, box=(0.0, 1.0)):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 0.8, d)
    w = rng.standard_normal(d)
    w[rng.choice(d, 5, replace=False)] = 0.0  # coordinates the solver never takes
    # The hyperplane w . (x - x_b) = 0 at distance `reach` along w: f < 0 at x.
    x_b = x + reach * w / np.linalg.norm(w)
    return x, w, x_b, np.full(d, box[0]), np.full(d, box[1])


@pytest.mark.parametrize("seed,reach", [(0, 0.05), (1, 0.5), (2, 2.0), (3, 50.0), (4, 1e-3)])
def test_vectorised_solver_is_the_greedy_loop(seed, reach):
    x, w, x_b, lb, ub = _case(seed, reach=reach)
    expected = greedy_loop(x, w, x_b, lb, ub)
    got = np.asarray(
        sparse.linear_solver(*(jnp.asarray(a, jnp.float32) for a in (x, w, x_b, lb, ub))),
        np.float64,
    )
    changed = np.flatnonzero(np.abs(expected - x) > 1e-6)
    np.testing.assert_array_equal(np.flatnonzero(np.abs(got - x) > 1e-6), changed)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert np.all(got >= lb) and np.all(got <= ub)
    # Near hyperplanes take a single coordinate; far ones exhaust the box on many.
    if reach < 0.01:
        assert len(changed) == 1
    if reach == 50.0:
        assert len(changed) == 35  # every coordinate with w != 0, all at the box edge


def test_binding_box_limits_move_coordinates_to_their_edges():
    x, w, x_b, lb, ub = _case(7, reach=1.5)
    lb, ub = np.maximum(0.0, x - 0.1), np.minimum(1.0, x + 0.1)  # delta = 0.1
    expected = greedy_loop(x, w, x_b, lb, ub)
    got = np.asarray(
        sparse.linear_solver(*(jnp.asarray(a, jnp.float32) for a in (x, w, x_b, lb, ub))),
        np.float64,
    )
    np.testing.assert_allclose(got, expected, atol=2e-5)
    moved = np.abs(expected - x) > 1e-6
    at_edge = np.isclose(expected, lb, atol=1e-6) | np.isclose(expected, ub, atol=1e-6)
    assert moved.sum() >= 3 and at_edge[moved].sum() >= moved.sum() - 1


def test_affine_two_class_flips_in_one_iteration():
    # f = (g, -g) with g = w . x + c: the boundary is the hyperplane g = 0, and x
    # sits 0.05 / ||w|| from it.
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal(36), jnp.float32)
    x = jax.random.uniform(jax.random.PRNGKey(0), (6, 6, 1), minval=0.3, maxval=0.7)
    c = 0.05 - jnp.dot(w, x.ravel())
    apply_fn = lambda p, z: jnp.stack([p[0] @ z.ravel() + p[1], -(p[0] @ z.ravel() + p[1])])
    res = bgeom.sparsefool(apply_fn, (w, c), x)
    assert bool(res.converged) and int(res.iterations) == 1
    assert int(res.label) == 0 and int(res.adv_label) == 1
    adv = x + res.perturbation
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    # lambda_ x 0.05 of w . x to cover: the coordinate of the largest |w_j| alone.
    changed = np.flatnonzero(np.asarray(res.perturbation).ravel())
    np.testing.assert_array_equal(changed, [int(np.argmax(np.abs(np.asarray(w))))])
    assert float(res.pixels_changed) == pytest.approx(1 / 36)


@pytest.fixture(scope="module")
def digits_runs(digits_cnn, digits):
    apply_fn, params = digits_cnn.apply_fn, digits_cnn.params
    xs = jnp.asarray(digits.x_test[:48])
    sf = bgeom.batched(bgeom.sparsefool)(apply_fn, params, xs)
    df = bgeom.batched(bgeom.deepfool)(apply_fn, params, xs, bounds=(0.0, 1.0))
    return apply_fn, params, xs, sf, df


def test_digits_fooling_rate_and_sparsity(digits_runs):
    apply_fn, params, xs, sf, df = digits_runs
    rate = float(np.mean(sf.converged))
    px_sf = float(np.median(sf.pixels_changed[sf.converged]))
    changed_df = np.mean(np.any(np.abs(df.perturbation) > 0, axis=-1), axis=(1, 2))
    px_df = float(np.median(changed_df[df.converged]))
    print(
        f"digits CNN: SparseFool fooling rate {rate:.3f}, pixels changed {px_sf:.3f} "
        f"(DeepFool {px_df:.3f}), iterations median {np.median(sf.iterations)}"
    )
    assert rate >= 0.95
    assert px_sf <= 0.35 * px_df
    adv = np.asarray(xs) + sf.perturbation
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    labels = np.asarray(jax.vmap(lambda z: jnp.argmax(apply_fn(params, z)))(jnp.asarray(adv)))
    np.testing.assert_array_equal(labels, sf.adv_label)
    assert np.all(sf.adv_label[sf.converged] != sf.label[sf.converged])


def test_delta_is_never_exceeded_and_vmap_equals_batched(digits_runs):
    apply_fn, params, xs, sf, _ = digits_runs
    x = xs[:6]
    res = jax.jit(jax.vmap(lambda z: bgeom.sparsefool(apply_fn, params, z, delta=0.2)))(x)
    r = np.asarray(res.perturbation)
    assert np.abs(r).max() <= 0.2 * (1 + 1e-6) + 1e-7
    adv = np.asarray(x) + r
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    got = bgeom.batched(bgeom.sparsefool)(apply_fn, params, x, delta=0.2)
    np.testing.assert_array_equal(got.status, np.asarray(res.status))
    np.testing.assert_allclose(got.perturbation, r, atol=1e-4)
    np.testing.assert_array_equal(sf.label[:6], np.asarray(res.label))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lambda_": 0.0}, "lambda_"),
        ({"delta": -0.1}, "delta"),
        ({"bounds": (0.5, 0.6)}, "leave bounds"),
        ({"bounds": (1.0, 0.0)}, "low < high"),
        ({"max_iter": -1}, "max_iter"),
    ],
)
def test_bad_input_says_what_to_do(kwargs, match):
    apply_fn, params = affine_classifier(0, 3, shape=(4, 4, 1))
    x = jnp.full((4, 4, 1), 0.3).at[0, 0, 0].set(0.9)
    with pytest.raises(ValueError, match=match):
        bgeom.sparsefool(apply_fn, params, x, **kwargs)
    with pytest.raises(ValueError, match="ONE example"):
        bgeom.sparsefool(apply_fn, params, x[None])
