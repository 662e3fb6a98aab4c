"""Boundary curvature against closed forms (quadratic classifiers) and dense oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from curvature_cases import digits_curvature, quadratic_classifier, tangent_curvatures
from flax import nnx
from helpers import tol

import bgeom
from bgeom import curvature, models, spectra


@pytest.fixture(scope="module")
def quadratic():
    apply_fn, params = quadratic_classifier(0, 3)
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 4, 1))
    return apply_fn, params, x


@pytest.fixture(scope="module")
def smooth_mlp():
    model = models.create("mlp", (6, 6, 1), 4, hidden=(64,), activation="softplus", beta=4.0)
    return models.functional(model)


@pytest.fixture(scope="module")
def relu_mlp():
    model = models.create("mlp", (6, 6, 1), 4, hidden=(64,), activation="relu")
    return models.functional(model)


def _x36(seed=1):
    return jax.random.uniform(jax.random.PRNGKey(seed), (6, 6, 1))


def test_quadratic_curvatures_are_closed_form(quadratic):
    apply_fn, params, x = quadratic
    res = curvature.boundary_curvature(apply_fn, params, x, k=15, num_matvecs=15)
    assert bool(res.converged)
    assert int(res.operator) == 0 and float(res.scale) == 0.0  # smooth: exact HVPs
    i, j = int(res.label), int(res.adv_label)
    assert i == int(jnp.argmax(apply_fn(params, x))) and j != i
    z = np.asarray(res.boundary_point, np.float64).ravel()
    A, b, c = (np.asarray(a, np.float64) for a in params)
    F = lambda y: 0.5 * y @ (A[i] - A[j]) @ y + (b[i] - b[j]) @ y + c[i] - c[j]
    grad = (A[i] - A[j]) @ z + b[i] - b[j]
    # The point is on the boundary of the pair (i, j), on the DeepFool segment.
    assert abs(F(z)) <= 1e-5 * abs(F(np.asarray(x, np.float64).ravel()))
    expected = tangent_curvatures(A[i] - A[j], grad)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(np.asarray(res.curvatures), expected, atol=scale * 1e-4, rtol=0)
    assert np.all(np.diff(np.asarray(res.curvatures)) <= 0)  # sorted descending
    n = grad / np.linalg.norm(grad)
    np.testing.assert_allclose(np.asarray(res.normal).ravel(), n, atol=1e-5)
    U = np.asarray(res.directions, np.float64).reshape(15, -1)
    np.testing.assert_allclose(U @ U.T, np.eye(15), atol=1e-4)
    np.testing.assert_allclose(U @ n, 0.0, atol=1e-4)
    # Each direction is an eigenvector of P H P / ||grad F|| with its curvature.
    P = np.eye(16) - np.outer(n, n)
    AU = (P @ (A[i] - A[j]) @ P @ U.T).T / np.linalg.norm(grad)
    np.testing.assert_allclose(AU, np.asarray(res.curvatures)[:, None] * U, atol=scale * 1e-4)
    assert np.all(np.asarray(res.residuals) <= scale * 1e-4)
    # The spectral part alone, at the same point, gives the same answer.
    same = curvature.principal_curvatures(apply_fn, params, res.boundary_point, i, j, k=15)
    np.testing.assert_allclose(np.asarray(same.curvatures), expected, atol=scale * 1e-4)
    # The dense oracle agrees with the closed form too.
    dense = curvature.dense_curvatures(apply_fn, params, res.boundary_point, i, j)
    np.testing.assert_allclose(np.asarray(dense.curvatures), expected, atol=scale * 1e-5)


@pytest.mark.parametrize("which", ["largest", "smallest", "both", "magnitude"])
def test_which_selects_the_right_end(which):
    vals = jnp.asarray([-5.0, -1.0, 0.0, 2.0, 3.0, 4.0])  # ascending, as Lanczos returns
    got = np.asarray(vals[spectra.select(vals, 3, which)])
    expected = {
        "largest": [4.0, 3.0, 2.0],
        "smallest": [0.0, -1.0, -5.0],
        "both": [4.0, 3.0, -5.0],
        "magnitude": [4.0, 3.0, -5.0],
    }[which]
    np.testing.assert_array_equal(got, expected)
    got = np.asarray(vals[spectra.select(vals, 4, which)])
    assert np.all(np.diff(got) <= 0)
    if which == "magnitude":
        np.testing.assert_array_equal(got, [4.0, 3.0, 2.0, -5.0])
    if which == "both":
        np.testing.assert_array_equal(got, [4.0, 3.0, -1.0, -5.0])


def test_lanczos_matches_dense_oracle_on_smooth_mlp(smooth_mlp):
    apply_fn, params = smooth_mlp
    x = _x36()
    res = curvature.boundary_curvature(apply_fn, params, x, k=6, which="both", num_matvecs=20)
    assert bool(res.converged) and int(res.operator) == 0
    dense = curvature.dense_curvatures(
        apply_fn, params, res.boundary_point, res.label, res.adv_label
    )
    d = np.asarray(dense.curvatures)
    expected = np.concatenate([d[:3], d[-3:]])
    got, resid = np.asarray(res.curvatures), np.asarray(res.residuals)
    scale = np.max(np.abs(d))
    # 20 Krylov steps out of 35 pin down both ends; the residuals say how well.
    assert np.all(resid <= 1e-3 * scale)
    np.testing.assert_allclose(got, expected, atol=1e-3 * scale, rtol=0)
    np.testing.assert_allclose(
        np.asarray(res.normal), np.asarray(dense.normal), **tol(jnp.float32, 16)
    )
    # Same directions up to sign (both are sign-normalised the same way).
    D = np.asarray(dense.directions).reshape(35, -1)[[0, 1, 2, -3, -2, -1]]
    U = np.asarray(res.directions).reshape(6, -1)
    np.testing.assert_allclose(np.abs(np.sum(D * U, axis=1)), 1.0, atol=1e-2)


def _hvps(apply_fn, params, x, v, h):
    """Exact and finite-difference HVPs of f_0 - f_1 at x, in one jitted call."""

    @jax.jit
    def both(p, x, v):
        exact = curvature.hessian_vector_product(apply_fn, p, x, 0, 1)(v)
        fd = curvature.hessian_vector_product(apply_fn, p, x, 0, 1, operator="fd", h=h)(v)
        return exact, fd

    return both(params, x, v)


def test_finite_differences_match_exact_hvps(smooth_mlp, quadratic):
    apply_fn, params = smooth_mlp
    x = _x36()
    v = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    exact, fd = _hvps(apply_fn, params, x, v, 1e-2)
    err = float(jnp.linalg.norm(fd - exact) / jnp.linalg.norm(exact))
    assert err < 1e-2
    # Central differences are exact on a quadratic (up to rounding), at any h.
    qf, qp, qx = quadratic
    v = jax.random.normal(jax.random.PRNGKey(4), qx.shape)
    exact, fd = _hvps(qf, qp, qx, v, 0.5)
    np.testing.assert_allclose(np.asarray(fd), np.asarray(exact), rtol=1e-4, atol=1e-4)
    expected = np.asarray(qp[0][0] - qp[0][1]) @ np.asarray(v).ravel()
    np.testing.assert_allclose(np.asarray(exact).ravel(), expected, rtol=1e-5, atol=1e-5)


def test_relu_default_is_finite_differences_and_not_flat(relu_mlp):
    apply_fn, params = relu_mlp
    x = _x36()
    res = curvature.boundary_curvature(apply_fn, params, x, k=6, which="both")
    assert bool(res.converged)
    assert curvature.OPERATORS[int(res.operator)] == "fd"
    distance = float(jnp.linalg.norm(res.boundary_point - x))
    # The scale starts at DEFAULT_FD_SCALE x the distance and only ever doubles
    # (up to twice the distance) while the operator is flat.
    ratio = float(res.scale) / (curvature.DEFAULT_FD_SCALE * distance)
    doublings = np.log2(ratio)
    assert ratio >= 1 - 1e-5 and float(res.scale) <= 2 * distance * (1 + 1e-5)
    assert abs(doublings - round(doublings)) < 1e-4 or float(res.scale) == pytest.approx(
        2 * distance
    )
    kappa = np.asarray(res.curvatures)
    assert np.all(np.isfinite(kappa)) and np.any(np.abs(kappa) > 1e-3)
    # Asking for exact HVPs of a piecewise-linear net is refused with what to do.
    with pytest.raises(ValueError, match="operator='fd'"):
        curvature.boundary_curvature(apply_fn, params, x, operator="exact")
    # An explicit absolute scale is used as given.
    res_h = curvature.boundary_curvature(apply_fn, params, x, k=6, which="both", h=0.05)
    assert float(res_h.scale) == pytest.approx(0.05)
    assert not np.allclose(np.asarray(res_h.curvatures), kappa)


def _wide_region_relu(shift, seed=0, d=16, hidden=32):
    """A ReLU net whose units are all active within about ``shift`` of the origin."""
    rng = np.random.default_rng(seed)
    W1 = rng.standard_normal((hidden, d)) / np.sqrt(d)
    W2 = rng.standard_normal((3, hidden)) / np.sqrt(hidden)
    params = tuple(jnp.asarray(a, jnp.float32) for a in (W1, np.full(hidden, shift), W2))
    return (lambda p, x: p[2] @ jax.nn.relu(p[0] @ x.ravel() + p[1])), params


def _nearest_kink(params, z):
    """Distance from z to the nearest hyperplane where a hidden unit switches."""
    W1, b1 = (np.asarray(a, np.float64) for a in params[:2])
    pre = W1 @ np.asarray(z, np.float64).ravel() + b1
    return float(np.min(np.abs(pre) / np.linalg.norm(W1, axis=1)))


def test_relu_scale_grows_until_the_operator_sees_a_kink_or_says_flat():
    x = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (4, 4, 1))
    # Every unit active far beyond twice the distance to the boundary: the net
    # is affine there, so the operator is zero at every scale allowed.
    apply_fn, params = _wide_region_relu(5.0)
    res = curvature.boundary_curvature(apply_fn, params, x, k=4, which="both")
    distance = float(jnp.linalg.norm(res.boundary_point - x))
    assert _nearest_kink(params, res.boundary_point) > 2 * distance
    assert not bool(res.converged)
    assert curvature.STATUS_NAMES[int(res.status)] == "flat_at_scale"
    np.testing.assert_allclose(float(res.scale), 2 * distance, rtol=1e-5)
    # A given scale below the nearest kink is used as given, and said to be flat.
    res_h = curvature.boundary_curvature(apply_fn, params, x, k=4, which="both", h=1e-3)
    assert float(res_h.scale) == pytest.approx(1e-3)
    assert curvature.STATUS_NAMES[int(res_h.status)] == "flat_at_scale"
    # Kinks a little farther than the starting scale: h grows past them.
    apply_fn, params = _wide_region_relu(0.05)
    res = curvature.boundary_curvature(apply_fn, params, x, k=4, which="both")
    distance = float(jnp.linalg.norm(res.boundary_point - x))
    assert bool(res.converged)
    assert float(res.scale) > 1.5 * curvature.DEFAULT_FD_SCALE * distance
    assert float(res.scale) > _nearest_kink(params, res.boundary_point)
    assert np.any(np.abs(np.asarray(res.curvatures)) > 1e-3)


def test_relu_mlp_at_a_random_input_is_not_flat_by_default():
    model = models.create("mlp", (28, 28, 1), 10, hidden=(256, 256), activation="relu")
    apply_fn, params = models.functional(model)
    x = jax.random.uniform(jax.random.PRNGKey(0), (28, 28, 1))
    res = curvature.boundary_curvature(apply_fn, params, x, k=5)
    print("ReLU MLP 784-256-256-10:", np.asarray(res.curvatures), "h", float(res.scale))
    assert bool(res.converged) and float(res.scale) > 0
    assert float(np.max(np.abs(np.asarray(res.curvatures)))) > 1e-2


@pytest.mark.parametrize(
    "name,activation,flat",
    [
        ("mlp", "relu", True),
        ("cnn", "relu", True),
        ("lenet", "relu", True),
        ("mlp", "softplus", False),
        ("cnn", "gelu", False),
        ("cnn", "tanh", False),
    ],
)
def test_piecewise_linear_networks_are_detected(name, activation, flat):
    # The check needs shapes only: an abstract model (no initialisation) will do
    # (the MLP computes its input size with jnp, so it is built for real, small).
    if name == "mlp":
        model = models.create(name, (8, 8, 1), 10, activation=activation, hidden=(16,))
    else:
        model = nnx.eval_shape(lambda: models.create(name, (8, 8, 1), 10, activation=activation))
    apply_fn, params = models.functional(model)
    x = jax.ShapeDtypeStruct((8, 8, 1), jnp.float32)
    assert curvature.has_zero_input_hessian(apply_fn, params, x) is flat


def test_slq_density_recovers_the_spectrum(quadratic):
    apply_fn, params, x = quadratic
    res = curvature.boundary_curvature(apply_fn, params, x, k=15, num_matvecs=15)
    dens = curvature.curvature_density(
        apply_fn, params, x, jax.random.PRNGKey(5), num_probes=64, num_matvecs=15
    )
    assert bool(dens.converged)
    np.testing.assert_allclose(np.asarray(dens.boundary_point), np.asarray(res.boundary_point))
    nodes, weights = np.asarray(dens.nodes), np.asarray(dens.weights)
    kappa = np.asarray(res.curvatures)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    # Full Krylov depth: every probe's nodes are the whole spectrum.
    scale = np.max(np.abs(kappa))
    np.testing.assert_allclose(
        np.sort(nodes, axis=1)[:, ::-1], np.tile(kappa, (64, 1)), atol=1e-4 * scale
    )
    # The weights estimate the uniform spectral measure without bias: the second
    # moment is within 4 standard errors of the exact one.
    per_probe = np.sum(weights * nodes**2, axis=1)
    se = per_probe.std(ddof=1) / np.sqrt(len(per_probe))
    assert abs(per_probe.mean() - np.mean(kappa**2)) < 4 * se + 1e-6
    # The smoothed density integrates to one and has the right mean.
    grid = np.linspace(kappa.min() - 1, kappa.max() + 1, 2001)
    rho = np.asarray(curvature.spectral_density(dens.nodes, dens.weights, grid, 0.02))
    np.testing.assert_allclose(np.trapezoid(rho, grid), 1.0, atol=1e-3)
    mean = np.sum(weights * nodes) / 64
    np.testing.assert_allclose(np.trapezoid(rho * grid, grid), mean, atol=1e-3)


def _planted(seed=0, shape=(4, 4, 1), m=3):
    """Two classes, ``F(x) = 2 a.x + 0.5 x^T U D U^T x`` with U orthogonal to a: the
    boundary is curved exactly along span(U), the same at every point."""
    rng = np.random.default_rng(seed)
    dim = int(np.prod(shape))
    q, _ = np.linalg.qr(rng.standard_normal((dim, m + 1)))
    a, U = q[:, 0] * 2.0, q[:, 1:]
    D = np.array([0.6, -0.5, 0.4])[:m]
    H = U @ np.diag(D) @ U.T
    params = (jnp.asarray(a, jnp.float32), jnp.asarray(H, jnp.float32))

    def apply_fn(p, x):
        v = x.ravel()
        half = p[0] @ v + 0.25 * v @ p[1] @ v
        return jnp.stack([half, -half])

    return apply_fn, params, U


def test_shared_subspace_finds_planted_curved_directions():
    apply_fn, params, U = _planted()
    a = np.asarray(params[0])
    # Points on the positive side of the boundary, 0.3 to 0.6 from it along a.
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((8, 16)) * 0.3
    xs = (
        xs
        - np.outer(xs @ a, a) / (a @ a)
        + np.outer(rng.uniform(0.3, 0.6, 8), a / np.linalg.norm(a))
    )
    xs = jnp.asarray(xs.reshape(8, 4, 4, 1), jnp.float32)
    ss = curvature.shared_curved_subspace(apply_fn, params, xs, m=3, num_matvecs=15)
    assert bool(np.all(np.asarray(ss.converged)))
    B = np.asarray(ss.basis, np.float64).reshape(3, -1)
    # span(basis) == span(U): the projection of U onto the basis keeps all its energy.
    np.testing.assert_allclose(np.linalg.norm(B @ U) ** 2, 3.0, atol=1e-3)
    assert np.all(np.asarray(ss.residuals) <= 1e-4)
    # It is a subspace for margins along S; a perturbation inside S lies in S.
    S = bgeom.subspaces.from_basis(ss.basis)
    r = bgeom.subspace_deepfool(apply_fn, params, xs[0], S)
    assert bool(r.converged)
    np.testing.assert_allclose(
        float(curvature.projection_ratio(r.perturbation, ss.basis)), 1.0, atol=1e-4
    )


def test_misuse_raises_with_what_to_do(smooth_mlp):
    apply_fn, params = smooth_mlp
    x = _x36()
    with pytest.raises(ValueError, match="jax.vmap"):
        curvature.boundary_curvature(apply_fn, params, jnp.stack([x, x]))
    with pytest.raises(ValueError, match="which must be one of"):
        curvature.boundary_curvature(apply_fn, params, x, which="top")
    with pytest.raises(ValueError, match="exceeds the 35 dimensions"):
        curvature.boundary_curvature(apply_fn, params, x, k=36)
    with pytest.raises(ValueError, match="num_matvecs"):
        curvature.boundary_curvature(apply_fn, params, x, k=4, num_matvecs=3)
    with pytest.raises(ValueError, match="fd_scale"):
        curvature.boundary_curvature(apply_fn, params, x, fd_scale=0.0)
    with pytest.raises(ValueError, match="unknown operator"):
        curvature.boundary_curvature(apply_fn, params, x, operator="dense")
    with pytest.raises(ValueError, match="needs a finite-difference scale"):
        curvature.principal_curvatures(apply_fn, params, x, 0, 1, operator="fd")
    with pytest.raises(ValueError, match="batch"):
        curvature.shared_curved_subspace(apply_fn, params, x)


def test_digits_boundary_is_flat_along_most_directions():
    facts = digits_curvature()
    assert bool(np.all(np.asarray(facts.test.converged)))
    kappa = np.asarray(facts.test.curvatures)
    scale = np.max(np.abs(kappa), axis=1, keepdims=True)
    assert np.all(np.asarray(facts.test.residuals) <= 1e-3 * scale)
    flat = np.mean(np.abs(kappa) <= 0.1 * scale, axis=1)
    assert np.median(flat) > 0.5


def test_digits_perturbations_live_in_the_shared_curved_subspace():
    facts = digits_curvature()
    basis = facts.shared.basis
    m, d = basis.shape[0], 64
    r = facts.test.boundary_point - facts.x_test
    ratio = np.asarray(jax.vmap(lambda v: curvature.projection_ratio(v, basis))(r))
    rnd = bgeom.subspaces.random(jax.random.PRNGKey(0), (8, 8, 1), m).basis
    ratio_random = np.asarray(jax.vmap(lambda v: curvature.projection_ratio(v, rnd))(r))
    assert np.median(ratio) > 1.25 * curvature.random_baseline(m, d)
    assert np.median(ratio) > np.median(ratio_random)
