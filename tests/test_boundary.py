"""Boundary primitives: the linearised step, boundary points and their normals, statuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import affine_classifier, tol

import bgeom
from bgeom import boundary


def _hyperplane(params, label, other):
    """``w, b`` of ``f_other - f_label`` for an affine classifier (float64)."""
    W, b = (np.asarray(a, np.float64) for a in params)
    return W[other] - W[label], b[other] - b[label]


@pytest.mark.parametrize("num_classes", [2, 5, 10])
def test_affine_boundary_point_is_the_projection_onto_the_hyperplane(num_classes):
    apply_fn, params = affine_classifier(num_classes + 20, num_classes)
    x = jax.random.uniform(jax.random.PRNGKey(num_classes), (4, 4, 1))
    res = bgeom.boundary_point(apply_fn, params, x)
    assert bool(res.converged) and int(res.status) == boundary.CONVERGED
    w, c = _hyperplane(params, int(res.label), int(res.adv_label))
    xf = np.asarray(x, np.float64).ravel()
    g = w @ xf + c  # < 0: x is in class label
    expected = xf - g / (w @ w) * w
    np.testing.assert_allclose(np.asarray(res.point).ravel(), expected, **tol(jnp.float32, 64))
    np.testing.assert_allclose(
        float(res.distance), abs(g) / np.linalg.norm(w), **tol(jnp.float32, 64)
    )
    # The normal is the unit gradient of f_adv - f_label: into the adverse class.
    np.testing.assert_allclose(
        np.asarray(res.normal).ravel(), w / np.linalg.norm(w), **tol(jnp.float32, 16)
    )
    # The same answer as DeepFool's, without the overshoot.
    df = bgeom.deepfool(apply_fn, params, x)
    assert int(df.adv_label) == int(res.adv_label)
    np.testing.assert_allclose(
        float(df.margin), 1.02 * (float(res.distance) + 1e-4), **tol(jnp.float32, 16)
    )


def test_targeted_boundary_points_lie_on_the_chosen_boundary():
    apply_fn, params = affine_classifier(3, 6)
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 4, 1))
    label = int(jnp.argmax(apply_fn(params, x)))
    targets = jnp.asarray([t for t in range(6) if t != label])
    res = jax.vmap(lambda t: bgeom.boundary_point(apply_fn, params, x, target=t))(targets)
    assert bool(jnp.all(res.converged))
    np.testing.assert_array_equal(np.asarray(res.adv_label), np.asarray(targets))
    logits = jax.vmap(lambda z: apply_fn(params, z))(res.point)
    gap = logits[jnp.arange(len(targets)), targets] - logits[:, label]
    scale = float(jnp.max(jnp.abs(logits)))
    assert float(jnp.max(jnp.abs(gap))) < 1e-4 * scale
    # Reaching a chosen class is never closer than the nearest boundary.
    nearest = bgeom.boundary_point(apply_fn, params, x)
    assert float(jnp.min(res.distance)) >= float(nearest.distance) * (1 - 1e-5)


def test_smooth_boundary_point_has_zero_gap_and_unit_normal():
    model = bgeom.models.create("mlp", (6, 6, 1), 4, hidden=(24,), activation="tanh", seed=2)
    apply_fn, params = bgeom.models.functional(model)
    xs = jax.random.uniform(jax.random.PRNGKey(1), (6, 6, 6, 1))
    res = jax.jit(jax.vmap(lambda x: bgeom.boundary_point(apply_fn, params, x)))(xs)
    assert bool(jnp.all(res.converged))
    logits = jax.vmap(lambda z: apply_fn(params, z))(res.point)
    idx = jnp.arange(len(xs))
    gap = logits[idx, res.adv_label] - logits[idx, res.label]
    assert float(jnp.max(jnp.abs(gap))) < 1e-4
    np.testing.assert_allclose(
        np.asarray(jax.vmap(jnp.linalg.norm)(res.normal.reshape(len(xs), -1))), 1.0, rtol=1e-5
    )
    grad = jax.vmap(
        lambda z, a, b: jax.grad(lambda y: apply_fn(params, y)[a] - apply_fn(params, y)[b])(z)
    )(res.point, res.adv_label, res.label)
    cos = jnp.sum((grad * res.normal).reshape(len(xs), -1), 1) / jax.vmap(jnp.linalg.norm)(
        grad.reshape(len(xs), -1)
    )
    np.testing.assert_allclose(np.asarray(cos), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(res.distance),
        np.linalg.norm(np.asarray(res.point - xs).reshape(len(xs), -1), axis=1),
        rtol=1e-6,
    )


def test_failures_are_statuses():
    apply_fn, params = affine_classifier(0, 5)
    x = jnp.full((4, 4, 1), 0.5)
    res = bgeom.boundary_point(apply_fn, params, x, max_iter=0)
    assert not bool(res.converged)
    assert boundary.STATUS_NAMES[int(res.status)] == "not_flipped"
    label = int(jnp.argmax(apply_fn(params, x)))
    # Eagerly, the clean label as target is misuse; traced, it is a status.
    with pytest.raises(ValueError, match="own label"):
        bgeom.boundary_point(apply_fn, params, x, target=label)
    res = jax.jit(lambda t: bgeom.boundary_point(apply_fn, params, x, target=t))(label)
    assert boundary.STATUS_NAMES[int(res.status)] == "not_flipped"
    res = jax.jit(lambda z: bgeom.boundary_point(apply_fn, params, z))(x.at[0, 0, 0].set(jnp.nan))
    assert not bool(res.converged)
    assert boundary.STATUS_NAMES[int(res.status)] == "nonfinite"


def test_a_critical_point_is_zero_gradient():
    # f_1 - f_0 = |x|^2 - 1: at the origin every gradient vanishes.
    apply_fn = lambda p, x: jnp.stack([p - jnp.sum(jnp.square(x)), jnp.zeros(())])
    res = bgeom.boundary_point(apply_fn, jnp.float32(1.0), jnp.zeros((2, 1, 1)))
    assert not bool(res.converged)
    assert boundary.STATUS_NAMES[int(res.status)] == "zero_gradient"
    res = bgeom.boundary_point(apply_fn, jnp.float32(1.0), jnp.zeros((2, 1, 1)), target=1)
    assert boundary.STATUS_NAMES[int(res.status)] == "zero_gradient"
    # Off the critical point the same model has an exact answer: the unit circle.
    res = bgeom.boundary_point(apply_fn, jnp.float32(1.0), jnp.full((2, 1, 1), 0.3))
    assert bool(res.converged)
    np.testing.assert_allclose(float(jnp.linalg.norm(res.point)), 1.0, rtol=1e-5)


def test_step_to_hyperplane_crosses_an_affine_boundary_by_the_fixed_margin():
    w = jnp.asarray([3.0, -4.0])
    g = jnp.asarray(-2.0)  # g + <w, dz> = 0 at distance 0.4
    step = boundary.step_to_hyperplane(g, w, jnp.linalg.norm(w))
    np.testing.assert_allclose(float(g + w @ step), 5.0 * boundary.STEP_EPS, atol=1e-6)
    np.testing.assert_allclose(float(jnp.linalg.norm(step)), 0.4 + boundary.STEP_EPS, rtol=1e-6)


@pytest.mark.parametrize(
    "options,match",
    [
        (bgeom.DeepFoolOptions(candidates=1), "candidates"),
        (bgeom.DeepFoolOptions(max_iter=-1), "max_iter"),
        (bgeom.DeepFoolOptions(overshoot=-0.1), "overshoot"),
        (bgeom.DeepFoolOptions(bounds=(1.0, 0.0)), "low < high"),
        (bgeom.DeepFoolOptions(bounds=1.0), "pair"),
    ],
)
def test_options_are_validated_with_what_to_do(options, match):
    apply_fn, params = affine_classifier(0, 3)
    with pytest.raises(ValueError, match=match):
        options.checked("test", apply_fn, params, jnp.zeros((4, 4, 1)))
    with pytest.raises(ValueError, match=match):
        bgeom.boundary_curvature(apply_fn, params, jnp.zeros((4, 4, 1)), deepfool=options)


def test_options_cap_candidates_and_trace_overshoot():
    apply_fn, params = affine_classifier(0, 3)
    x, options = bgeom.DeepFoolOptions().checked("test", apply_fn, params, jnp.zeros((4, 4, 1)))
    assert options.candidates == 3 and options.overshoot.dtype == x.dtype
    leaves, treedef = jax.tree.flatten(options)
    assert len(leaves) == 1  # only overshoot is data; the rest is static
    assert jax.tree.unflatten(treedef, leaves) == options
