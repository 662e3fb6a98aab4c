"""Curvature of the decision boundary: principal curvatures, spectra, shared curved directions.

At a boundary point ``z = x + r(x)`` between the predicted class ``k0`` and the
adverse class ``j`` (``bgeom.boundary``: DeepFool's point refined onto the
boundary), let ``F = f_k0 - f_j``, ``n = grad F(z) / ||grad F(z)||`` and
``P = I - n n^T``. The principal curvatures are the eigenvalues of
``P H_F(z) P / ||grad F(z)||`` on the tangent space (``d - 1`` of them); the
curvature along a unit tangent ``u`` is ``u^T H_F u / ||grad F||``. With this
sign convention a positive curvature bends the boundary towards the adverse
class along ``u`` (``F`` grows on both sides of ``z`` along ``u``, so the
adverse region is locally convex there) and a negative one bends it towards
``k0`` (the ``k0`` region is locally convex).

Everything is matrix-free: Hessian-vector products of ``F`` with respect to
the input (``bgeom.operators``: exact autodiff, or finite differences of
gradients at a scale ``h`` for piecewise-linear networks, chosen by
``operator="auto"``), then Lanczos (``bgeom.spectra``, matfree). A dense
oracle (``jax.hessian`` + ``eigh``) exists for small inputs and tests. Every
result records the operator and scale it used, ``converged`` and a ``status``
(``STATUS_NAMES``). A spectrum of zeros is never a result: finite differences
on a ReLU net are exactly zero below the distance to the nearest change of
activation pattern, so the default scale grows until the operator sees the
bend, and an operator still flat at the largest scale is ``flat_at_scale``;
if a network hides its piecewise linearity from ``auto``'s check and the
exact spectrum comes back identically zero, the status is ``zero_spectrum``. See
docs/curvature.md.

References:
  Fawzi, Moosavi-Dezfooli, Frossard, Soatto. "Empirical study of the topology
  and geometry of deep networks" (first version: "Classification regions of
  deep neural networks"), CVPR 2018. https://arxiv.org/abs/1705.09552
  Ubaru, Chen, Saad. "Fast estimation of tr(f(A)) via stochastic Lanczos
  quadrature", SIAM J. Matrix Anal. Appl. 2017. https://doi.org/10.1137/16M1104974
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from matfree import decomp

from bgeom import _checks, boundary, operators, spectra
from bgeom.operators import (
    DEFAULT_FD_SCALE,
    OPERATORS,
    curvature_operator,
    has_zero_input_hessian,
    hessian_vector_product,
)
from bgeom.spectra import WHICH, spectral_density

__all__ = [
    "DEFAULT_FD_SCALE",
    "OPERATORS",
    "STATUS_NAMES",
    "WHICH",
    "CurvatureDensity",
    "CurvatureResult",
    "DenseCurvatures",
    "SharedSubspace",
    "boundary_curvature",
    "curvature_density",
    "curvature_operator",
    "dense_curvatures",
    "has_zero_input_hessian",
    "hessian_vector_product",
    "principal_curvatures",
    "projection_ratio",
    "random_baseline",
    "shared_curved_subspace",
    "shared_curved_subspace_at",
    "spectral_density",
]

# ``status`` codes (index into STATUS_NAMES): the boundary point's, then the spectrum's.
CONVERGED = boundary.CONVERGED
NONFINITE = boundary.NONFINITE
ZERO_SPECTRUM = len(boundary.STATUS_NAMES)  # auto chose exact HVPs and got all zeros
FLAT_AT_SCALE = ZERO_SPECTRUM + 1  # finite differences stay exactly zero at the largest scale
STATUS_NAMES = (*boundary.STATUS_NAMES, "zero_spectrum", "flat_at_scale")


class CurvatureResult(NamedTuple):
    """Principal curvatures of the decision boundary at one boundary point.

    Attributes:
      curvatures: ``(k,)`` principal curvatures, sorted descending.
      directions: ``(k, H, W, C)`` unit tangent directions (principal directions),
        one per curvature; each is sign-normalised so that its largest-magnitude
        entry is positive.
      boundary_point: ``z``, the point on ``F = f_label - f_adv_label = 0``.
      normal: ``grad F(z) / ||grad F(z)||`` (points towards ``label``).
      residuals: ``(k,)`` ``||A u_i - kappa_i u_i||`` evaluated with the operator
        ``A = P H P / ||grad F||`` itself: each ``kappa_i`` lies within
        ``residuals_i`` of a true eigenvalue of ``A`` (when ``A`` is linear).
      label: the model's prediction at ``x`` (``k0``).
      adv_label: the adverse class ``j`` of the boundary.
      converged: DeepFool flipped the label, the point was refined onto the
        boundary, every number is finite, and (``auto``) the exact spectrum was
        not identically zero (``status == 0``).
      status: why it did or did not converge, an index into ``STATUS_NAMES``.
      operator: ``0`` exact HVPs, ``1`` finite differences (``OPERATORS[i]``).
      scale: the finite-difference scale ``h`` (``0`` for exact HVPs).
    """

    curvatures: jax.Array
    directions: jax.Array
    boundary_point: jax.Array
    normal: jax.Array
    residuals: jax.Array
    label: jax.Array
    adv_label: jax.Array
    converged: jax.Array
    status: jax.Array
    operator: jax.Array
    scale: jax.Array


class DenseCurvatures(NamedTuple):
    """Every principal curvature at a boundary point, from a dense Hessian (oracle).

    Attributes:
      curvatures: ``(d - 1,)`` all tangent-space curvatures, sorted descending.
      directions: ``(d - 1, H, W, C)`` the matching unit tangent directions.
      normal: the unit normal ``grad F / ||grad F||``.
    """

    curvatures: jax.Array
    directions: jax.Array
    normal: jax.Array


class CurvatureDensity(NamedTuple):
    """Stochastic Lanczos quadrature of the curvature spectrum at one boundary point.

    The spectral measure ``(1 / (d - 1)) sum_i delta(kappa - kappa_i)`` of the
    ``d - 1`` principal curvatures is approximated by
    ``(1 / num_probes) sum_l sum_j weights[l, j] delta(kappa - nodes[l, j])``;
    ``spectral_density`` smooths it onto a grid.

    Attributes:
      nodes: ``(num_probes, num_matvecs)`` Ritz values of each probe's Lanczos run.
      weights: ``(num_probes, num_matvecs)`` quadrature weights; each row sums to 1.
      boundary_point, label, adv_label, converged, status, operator, scale: as
        in ``CurvatureResult``.
    """

    nodes: jax.Array
    weights: jax.Array
    boundary_point: jax.Array
    label: jax.Array
    adv_label: jax.Array
    converged: jax.Array
    status: jax.Array
    operator: jax.Array
    scale: jax.Array


class SharedSubspace(NamedTuple):
    """The top eigenvectors of the curvature operator averaged over boundary points.

    Attributes:
      basis: ``(m, H, W, C)`` orthonormal directions (flattened rows), ready for
        ``bgeom.subspaces.from_basis`` and ``bgeom.subspace_deepfool``.
      curvatures: ``(m,)`` the matching eigenvalues of the averaged operator,
        sorted descending.
      residuals: ``(m,)`` ``||A_bar u_i - kappa_i u_i||``.
      boundary_points: ``(N, H, W, C)`` the boundary point of every input.
      label, adv_label: ``(N,)`` class pair of every boundary point.
      converged: ``(N,)`` which points entered the average (DeepFool flipped and
        the refinement bracketed the boundary).
      status: ``(N,)`` why each point did or did not enter (``STATUS_NAMES``).
      operator: ``0`` exact or ``1`` finite differences (one for all points).
      scale: ``(N,)`` the finite-difference scale of every point (``0`` if exact).
    """

    basis: jax.Array
    curvatures: jax.Array
    residuals: jax.Array
    boundary_points: jax.Array
    label: jax.Array
    adv_label: jax.Array
    converged: jax.Array
    status: jax.Array
    operator: jax.Array
    scale: jax.Array


def _default_key(key: Any) -> jax.Array:
    return jax.random.PRNGKey(0) if key is None else key


def _scale_key(key: jax.Array) -> jax.Array:
    """The key of the probe directions that choose the finite-difference scale."""
    return jax.random.fold_in(key, 1)


class _Found(NamedTuple):
    """A boundary point found from ``x`` and the finite-difference scale it gets."""

    z: jax.Array
    label: jax.Array
    adv_label: jax.Array
    status: jax.Array  # boundary.STATUS_NAMES code, or FLAT_AT_SCALE
    scale: jax.Array


def _find(apply_fn, params, x, options, fd_scale, h, operator, key) -> _Found:
    """DeepFool's boundary point refined onto ``F = 0`` and its scale ``h`` (traceable)."""
    search, z, bracket = boundary.find_boundary_point(apply_fn, params, x, options)
    F = boundary.pair_function(apply_fn, params, search.label, search.adv_label)
    distance = operators.norm(z - x)
    scale = operators.finite_difference_scale(operator, F, z, key, h, fd_scale, distance)
    status = boundary.boundary_status(search, bracket)
    status = jnp.where((status == CONVERGED) & scale.flat, FLAT_AT_SCALE, status)
    return _Found(z, search.label, search.adv_label, status, scale.h)


def _status(found: jax.Array, finite: jax.Array, nonzero: Any = True, zero: int = 0) -> jax.Array:
    """``STATUS_NAMES`` code: the boundary's failure, else the spectrum's (``zero`` if all 0)."""
    spectrum = jnp.where(finite, jnp.where(nonzero, CONVERGED, zero), NONFINITE)
    return jnp.where(found == CONVERGED, spectrum, found).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "k", "which", "num_matvecs", "operator", "auto"),
)
def _principal_curvatures_core(
    apply_fn,
    params,
    z,
    label,
    adv_label,
    h,
    key,
    *,
    k,
    which,
    num_matvecs,
    operator,
    auto,
):
    F = boundary.pair_function(apply_fn, params, label, adv_label)
    matvec, n, gnorm = operators.shape_operator(F, z, operator, h)
    vals, vecs, residuals = spectra.lanczos_eigs(
        matvec, operators.tangent_start(key, n), k, which, num_matvecs
    )
    finite = (
        jnp.all(jnp.isfinite(vals)) & jnp.all(jnp.isfinite(residuals)) & jnp.isfinite(gnorm)
    ) & (gnorm > 0)
    # A spectrum at the jitter's level is no result: for exact HVPs (``auto``) a
    # hidden piecewise-linear net, for finite differences a scale too small.
    nonzero = jnp.any(jnp.abs(vals) > 1e3 * operators.JITTER)
    zero = ZERO_SPECTRUM if operator == "exact" else FLAT_AT_SCALE
    if operator == "exact" and not auto:
        nonzero = jnp.asarray(True)
    return vals, vecs, n, residuals, _status(jnp.int32(CONVERGED), finite, nonzero, zero)


@functools.partial(
    jax.jit,
    static_argnames=(
        "apply_fn",
        "k",
        "which",
        "num_matvecs",
        "operator",
        "auto",
    ),
)
def _boundary_curvature_core(
    apply_fn, params, x, options, fd_scale, h, key, *, k, which, num_matvecs, operator, auto
):
    b = _find(apply_fn, params, x, options, fd_scale, h, operator, _scale_key(key))
    vals, vecs, n, residuals, spectrum = _principal_curvatures_core(
        apply_fn,
        params,
        b.z,
        b.label,
        b.adv_label,
        b.scale,
        key,
        k=k,
        which=which,
        num_matvecs=num_matvecs,
        operator=operator,
        auto=auto,
    )
    status = jnp.where(b.status == CONVERGED, spectrum, b.status)
    return CurvatureResult(
        curvatures=vals,
        directions=vecs,
        boundary_point=b.z,
        normal=n,
        residuals=residuals,
        label=b.label,
        adv_label=b.adv_label,
        converged=status == CONVERGED,
        status=status,
        operator=jnp.asarray(OPERATORS.index(operator), jnp.int32),
        scale=b.scale,
    )


def boundary_curvature(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    *,
    k: int = 10,
    which: str = "largest",
    num_matvecs: int | None = None,
    operator: str = "auto",
    fd_scale: float = DEFAULT_FD_SCALE,
    h: float | None = None,
    key: jax.Array | None = None,
    deepfool: boundary.DeepFoolOptions | None = None,
) -> CurvatureResult:
    """Principal curvatures of the decision boundary near ONE example.

    DeepFool finds ``r`` (between the predicted class ``k0`` and the adverse class
    ``j``); the point ``x + r`` is refined onto ``F = f_k0 - f_j = 0`` along the
    segment from ``x`` (false position, at most 30 forward passes). Lanczos
    (matfree, full reorthogonalisation, ``num_matvecs`` operator products from a
    random tangent start vector) on ``A = P H_F P / ||grad F||`` gives the
    principal curvatures; ``k`` of them are returned, sorted descending, with
    residuals computed with ``A`` itself.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters (any pytree); traced.
      x: one example of shape (H, W, C).
      k: number of principal curvatures returned.
      which: ``"largest"`` (most positive), ``"smallest"`` (most negative),
        ``"both"`` (``k - k // 2`` largest and ``k // 2`` smallest) or
        ``"magnitude"`` (largest ``|kappa|``).
      num_matvecs: Krylov depth (operator products); default
        ``min(d - 1, max(2k + 20, 3k))``. With ``d - 1`` the whole spectrum is
        exact up to rounding.
      operator: ``"auto"`` (default: exact HVPs unless the network is piecewise
        linear, then finite differences), ``"exact"`` or ``"fd"``.
      fd_scale: the starting finite-difference scale relative to the distance
        ``||z - x||`` to the boundary (``h = fd_scale * ||z - x||``, at least
        1e-4). On a piecewise-linear network the operator is exactly zero when
        no unit changes state within ``+-h``: ``h`` then doubles until the
        gradient changes across ``+-h`` (``bgeom.operators``), up to twice
        the distance; ``scale`` reports the ``h`` used and the status
        ``flat_at_scale`` an operator that stayed flat.
      h: an absolute finite-difference scale instead (used as given; a flat
        operator there is ``flat_at_scale``).
      key: PRNG key of the Lanczos start vector and of the probe directions
        that choose the scale (default: a fixed key).
      deepfool: the settings of the DeepFool search for the boundary point
        (``bgeom.DeepFoolOptions``; default: its defaults).

    Returns:
      ``CurvatureResult``; ``converged=False`` and a ``status`` (never an
      exception) when DeepFool did not flip the label, the point could not be
      refined, or the spectrum is not finite.

    References:
      Method page: docs/curvature.md.
      Fawzi, Moosavi-Dezfooli, Frossard, Soatto. "Empirical study of the topology
      and geometry of deep networks", CVPR 2018. https://arxiv.org/abs/1705.09552
    """
    fn = "boundary_curvature"
    options = boundary.options_or_default(deepfool, "deepfool")
    x, options = options.checked(fn, apply_fn, params, x)
    dim = x.size - 1
    k, num_matvecs = spectra.check_spectrum_args(fn, k, which, num_matvecs, dim)
    fd_scale, h = operators.check_fd_args(fn, fd_scale, h)
    resolved = operators.resolve_operator(operator, apply_fn, params, x, fn)
    return _boundary_curvature_core(
        apply_fn,
        params,
        x,
        options,
        jnp.asarray(fd_scale, x.dtype),
        jnp.asarray(0.0 if h is None else h, x.dtype),
        _default_key(key),
        k=k,
        which=which,
        num_matvecs=num_matvecs,
        operator=resolved,
        auto=operator == "auto",
    )


def principal_curvatures(
    apply_fn: Callable,
    params: Any,
    z: jax.Array,
    label: int | jax.Array,
    adv_label: int | jax.Array,
    *,
    k: int = 10,
    which: str = "largest",
    num_matvecs: int | None = None,
    operator: str = "exact",
    h: float | None = None,
    key: jax.Array | None = None,
) -> CurvatureResult:
    """Principal curvatures of ``F = f_label - f_adv_label = 0`` at a GIVEN point ``z``.

    The spectral part of ``boundary_curvature`` alone (no DeepFool, no
    refinement): use it when the boundary point is known, e.g. for benchmarks or
    for level sets ``F = c``. The curvatures are those of the level set of
    ``F`` through ``z``.

    Args:
      z: the point, shape (H, W, C).
      label, adv_label: the class pair.
      operator: ``"exact"`` or ``"fd"`` (then ``h`` is required).
      k, which, num_matvecs, key: as in ``boundary_curvature``.

    Returns:
      ``CurvatureResult`` with ``boundary_point = z``; ``converged`` says whether
      every number is finite (``status`` 0, else ``nonfinite``).
    """
    fn = "principal_curvatures"
    z = _checks.check_example(z, fn)
    num_classes = _checks.check_logits(apply_fn, params, z, fn)
    for name, c in (("label", label), ("adv_label", adv_label)):
        if _checks.is_concrete(c) and not 0 <= int(c) < num_classes:
            raise ValueError(f"{fn}: {name} must be a class index in [0, {num_classes}).")
    k, num_matvecs = spectra.check_spectrum_args(fn, k, which, num_matvecs, z.size - 1)
    if operator not in OPERATORS:
        raise ValueError(f"{fn}: operator must be 'exact' or 'fd'; got {operator!r}.")
    _, h = operators.check_fd_args(fn, 1.0, h)
    if operator == "fd" and h is None:
        raise ValueError(f"{fn}: operator='fd' needs a finite-difference scale h > 0.")
    operators.resolve_operator(operator, apply_fn, params, z, fn)
    label = jnp.asarray(label, jnp.int32)
    adv_label = jnp.asarray(adv_label, jnp.int32)
    scale = jnp.asarray(0.0 if operator == "exact" else h, z.dtype)
    vals, vecs, n, residuals, status = _principal_curvatures_core(
        apply_fn,
        params,
        z,
        label,
        adv_label,
        scale,
        _default_key(key),
        k=k,
        which=which,
        num_matvecs=num_matvecs,
        operator=operator,
        auto=False,
    )
    return CurvatureResult(
        curvatures=vals,
        directions=vecs,
        boundary_point=z,
        normal=n,
        residuals=residuals,
        label=label,
        adv_label=adv_label,
        converged=status == CONVERGED,
        status=status,
        operator=jnp.asarray(OPERATORS.index(operator), jnp.int32),
        scale=scale,
    )


def dense_curvatures(
    apply_fn: Callable,
    params: Any,
    z: jax.Array,
    label: int | jax.Array,
    adv_label: int | jax.Array,
    *,
    operator: str = "exact",
    h: float | None = None,
) -> DenseCurvatures:
    """Every principal curvature at ``z`` from a dense Hessian: the test oracle.

    ``exact``: ``jax.hessian`` of ``F``; ``fd``: the finite-difference operator
    applied to every coordinate vector, symmetrised. The tangent space is
    spanned by the last ``d - 1`` columns of the Householder reflection that
    maps ``n`` to a coordinate axis, so the spectrum has exactly ``d - 1``
    entries (no spurious zero along the normal). Costs ``O(d)`` HVPs and an
    ``O(d^3)`` eigendecomposition: for small inputs only.

    Args:
      apply_fn, params, z, label, adv_label: as in ``principal_curvatures``.
      operator: ``"exact"`` or ``"fd"`` (needs ``h``).
      h: finite-difference scale.

    Returns:
      ``DenseCurvatures(curvatures (d-1,), directions (d-1, H, W, C), normal)``.
    """
    fn = "dense_curvatures"
    z = _checks.check_example(z, fn)
    _checks.check_logits(apply_fn, params, z, fn)
    if operator not in OPERATORS:
        raise ValueError(f"{fn}: operator must be 'exact' or 'fd'; got {operator!r}.")
    if operator == "fd" and h is None:
        raise ValueError(f"{fn}: operator='fd' needs a finite-difference scale h > 0.")
    return _dense_core(
        apply_fn,
        params,
        z,
        jnp.asarray(label, jnp.int32),
        jnp.asarray(adv_label, jnp.int32),
        jnp.asarray(0.0 if h is None else h, z.dtype),
        operator=operator,
    )


@functools.partial(jax.jit, static_argnames=("apply_fn", "operator"))
def _dense_core(apply_fn, params, z, label, adv_label, h, *, operator):
    F = boundary.pair_function(apply_fn, params, label, adv_label)
    d = z.size
    g = jax.grad(F)(z).ravel()
    gnorm = operators.norm(g)
    n = g / gnorm
    if operator == "exact":
        H = jax.hessian(F)(z).reshape(d, d)
    else:
        hvp, _ = operators.hvp_and_grad(F, z, operator, h)
        M = jax.vmap(lambda e: hvp(e.reshape(z.shape)).ravel())(jnp.eye(d, dtype=z.dtype))
        H = M.T
    H = 0.5 * (H + H.T)
    # Householder: Q = I - 2 u u^T / ||u||^2 with Q n = -sign(n_0) e_0.
    sign = jnp.where(n[0] >= 0, 1.0, -1.0)
    u = n.at[0].add(sign)
    Q = jnp.eye(d, dtype=z.dtype) - 2.0 * jnp.outer(u, u) / jnp.dot(u, u)
    B = Q[:, 1:]  # orthonormal basis of the tangent space
    vals, V = jnp.linalg.eigh(B.T @ H @ B / gnorm)
    dirs = (B @ V).T[::-1]
    return DenseCurvatures(
        vals[::-1], spectra.canonical_sign(dirs.reshape(d - 1, *z.shape)), n.reshape(z.shape)
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "apply_fn",
        "num_probes",
        "num_matvecs",
        "operator",
    ),
)
def _density_core(
    apply_fn, params, x, key, options, fd_scale, h, *, num_probes, num_matvecs, operator
):
    b = _find(apply_fn, params, x, options, fd_scale, h, operator, _scale_key(key))
    F = boundary.pair_function(apply_fn, params, b.label, b.adv_label)
    matvec, n, gnorm = operators.shape_operator(F, b.z, operator, b.scale)
    tridiag = decomp.tridiag_sym(num_matvecs, reortho="full", materialize=True, custom_vjp=False)

    def one_probe(k):
        # Gaussian probes projected onto the tangent space and normalised are
        # uniform on its unit sphere, so E[(u . q_i)^2] = 1 / (d - 1) exactly:
        # the quadrature weights estimate the spectral measure without bias.
        v0 = operators.tangent_start(k, n)
        T = tridiag(matvec, v0).J_small
        nodes, vecs = jnp.linalg.eigh(T)
        return nodes, jnp.square(vecs[0, :])

    nodes, weights = jax.vmap(one_probe)(jax.random.split(key, num_probes))
    finite = jnp.all(jnp.isfinite(nodes)) & jnp.all(jnp.isfinite(weights)) & (gnorm > 0)
    status = _status(b.status, finite)
    return CurvatureDensity(
        nodes=nodes,
        weights=weights,
        boundary_point=b.z,
        label=b.label,
        adv_label=b.adv_label,
        converged=status == CONVERGED,
        status=status,
        operator=jnp.asarray(OPERATORS.index(operator), jnp.int32),
        scale=b.scale,
    )


def curvature_density(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    key: jax.Array,
    *,
    num_probes: int = 8,
    num_matvecs: int = 30,
    operator: str = "auto",
    fd_scale: float = DEFAULT_FD_SCALE,
    h: float | None = None,
    deepfool: boundary.DeepFoolOptions | None = None,
) -> CurvatureDensity:
    """Density of ALL principal curvatures near one example, by stochastic Lanczos quadrature.

    At the same boundary point as ``boundary_curvature``, ``num_probes`` random
    unit tangent vectors each start a Lanczos run of ``num_matvecs`` steps
    (matfree ``decomp.tridiag_sym``); the eigenvalues of each tridiagonal matrix
    are quadrature nodes and the squared first components of its eigenvectors
    the weights (Gauss quadrature of the spectral measure seen from the probe).
    Exact for polynomials of degree ``< 2 num_matvecs`` per probe; the average
    over probes is an unbiased estimate of the spectral measure.

    Args:
      key: PRNG key of the probes.
      num_probes: number of random probe vectors.
      num_matvecs: Lanczos steps per probe (at most d - 1).
      operator, fd_scale, h, deepfool: as in ``boundary_curvature``.

    Returns:
      ``CurvatureDensity``; smooth it with ``spectral_density``.

    References:
      Method page: docs/curvature.md.
      Ubaru, Chen, Saad, SIAM J. Matrix Anal. Appl. 38(4), 2017.
      https://doi.org/10.1137/16M1104974 ; Ghorbani, Krishnan, Xiao, "An
      investigation into neural net optimization via Hessian eigenvalue
      density", ICML 2019. https://arxiv.org/abs/1901.10159
    """
    fn = "curvature_density"
    options = boundary.options_or_default(deepfool, "deepfool")
    x, options = options.checked(fn, apply_fn, params, x)
    num_probes = _checks.check_positive_int(num_probes, "num_probes", fn)
    num_matvecs = _checks.check_positive_int(num_matvecs, "num_matvecs", fn)
    if num_matvecs > x.size - 1:
        raise ValueError(f"{fn}: num_matvecs must be <= d - 1 = {x.size - 1}.")
    fd_scale, h = operators.check_fd_args(fn, fd_scale, h)
    resolved = operators.resolve_operator(operator, apply_fn, params, x, fn)
    return _density_core(
        apply_fn,
        params,
        x,
        key,
        options,
        jnp.asarray(fd_scale, x.dtype),
        jnp.asarray(0.0 if h is None else h, x.dtype),
        num_probes=num_probes,
        num_matvecs=num_matvecs,
        operator=resolved,
    )


@functools.partial(jax.jit, static_argnames=("apply_fn", "operator"))
def _find_batch(apply_fn, params, xs, options, fd_scale, h, key, *, operator) -> _Found:
    key = _scale_key(key)
    return jax.vmap(lambda x: _find(apply_fn, params, x, options, fd_scale, h, operator, key))(xs)


@functools.partial(jax.jit, static_argnames=("apply_fn", "m", "which", "num_matvecs", "operator"))
def _average_core(
    apply_fn, params, zs, labels, adv_labels, ok, scales, key, *, m, which, num_matvecs, operator
):
    count = jnp.maximum(jnp.sum(ok.astype(zs.dtype)), 1.0)

    def averaged(v):
        # One batched product over all points: each point's shape operator,
        # masked to the points whose boundary was found, then averaged.
        def one(z, label, adv, scale):
            F = boundary.pair_function(apply_fn, params, label, adv)
            return operators.shape_operator(F, z, operator, scale)[0](v)

        out = jax.vmap(one)(zs, labels, adv_labels, scales)
        out = jnp.where(ok.reshape((-1,) + (1,) * v.ndim), out, 0.0)
        return jnp.sum(out, axis=0) / count

    v0 = jax.random.normal(key, zs.shape[1:], zs.dtype)
    vals, vecs, residuals = spectra.lanczos_eigs(averaged, v0, m, which, num_matvecs)
    return vals, vecs, residuals


def shared_curved_subspace_at(
    apply_fn: Callable,
    params: Any,
    points: CurvatureResult,
    *,
    m: int = 10,
    which: str = "magnitude",
    num_matvecs: int | None = None,
    operator: str | None = None,
    key: jax.Array | None = None,
) -> SharedSubspace:
    """``shared_curved_subspace`` at boundary points already found by ``boundary_curvature``.

    Reuses the boundary points, class pairs, finite-difference scales and
    ``converged`` flags of a batch of ``CurvatureResult`` (e.g. from
    ``jax.vmap(boundary_curvature)``), so no DeepFool runs again.

    Args:
      points: a ``CurvatureResult`` with a leading batch axis N.
      m, which, num_matvecs, key: as in ``shared_curved_subspace``.
      operator: ``"exact"`` or ``"fd"``; default: read from ``points.operator``
        (which must then be concrete, i.e. outside jit).

    Returns:
      ``SharedSubspace``.
    """
    fn = "shared_curved_subspace_at"
    zs = jnp.asarray(points.boundary_point)
    if zs.ndim != 4:
        raise ValueError(
            f"{fn}: points must be a batch of CurvatureResult (boundary_point of shape "
            f"(N, H, W, C)); got boundary_point of shape {tuple(zs.shape)}."
        )
    if operator is None:
        if not _checks.is_concrete(points.operator):
            raise ValueError(f"{fn}: under jit, pass operator='exact' or 'fd' explicitly.")
        codes = np.unique(np.asarray(points.operator))
        if codes.size != 1:
            raise ValueError(f"{fn}: the points were computed with different operators.")
        operator = OPERATORS[int(codes[0])]
    if operator not in OPERATORS:
        raise ValueError(f"{fn}: operator must be 'exact' or 'fd'; got {operator!r}.")
    _checks.check_logits(apply_fn, params, zs[0], fn)
    m, num_matvecs = spectra.check_spectrum_args(fn, m, which, num_matvecs, zs[0].size)
    vals, vecs, residuals = _average_core(
        apply_fn,
        params,
        zs,
        points.label,
        points.adv_label,
        points.converged,
        jnp.asarray(points.scale, zs.dtype),
        _default_key(key),
        m=m,
        which=which,
        num_matvecs=num_matvecs,
        operator=operator,
    )
    return SharedSubspace(
        basis=vecs,
        curvatures=vals,
        residuals=residuals,
        boundary_points=zs,
        label=points.label,
        adv_label=points.adv_label,
        converged=points.converged,
        status=points.status,
        operator=jnp.asarray(OPERATORS.index(operator), jnp.int32),
        scale=jnp.asarray(points.scale, zs.dtype),
    )


def shared_curved_subspace(
    apply_fn: Callable,
    params: Any,
    xs: jax.Array,
    *,
    m: int = 10,
    which: str = "magnitude",
    num_matvecs: int | None = None,
    operator: str = "auto",
    fd_scale: float = DEFAULT_FD_SCALE,
    h: float | None = None,
    key: jax.Array | None = None,
    deepfool: boundary.DeepFoolOptions | None = None,
) -> SharedSubspace:
    """The directions along which the boundary is curved, shared by many points.

    For every example of the batch ``xs``, its boundary point and shape operator
    ``A_i = P_i H_i P_i / ||grad F_i||`` (as in ``boundary_curvature``); one
    Lanczos run on the average ``A_bar = mean_i A_i`` (each product is one
    batched product over all points) gives its top ``m`` eigenvectors. Points
    where DeepFool did not flip are left out of the average.

    Args:
      xs: a batch ``(N, H, W, C)`` (this analysis is an average over points).
      m: dimension of the subspace.
      which: which eigenvalues of ``A_bar`` define it (default ``"magnitude"``:
        largest ``|kappa|``, curved either way; see ``boundary_curvature``).
      num_matvecs: Krylov depth (default ``min(d, max(2m + 20, 3m))``).
      operator, fd_scale, h, key, deepfool: as in ``boundary_curvature``
        (``auto`` decides once for the network).

    Returns:
      ``SharedSubspace``; ``bgeom.subspaces.from_basis(result.basis)`` is the
      subspace S for ``bgeom.subspace_deepfool``.

    References:
      Method page: docs/curvature.md.
      Fawzi et al., CVPR 2018, section 5 (curvature and vulnerability).
      https://arxiv.org/abs/1705.09552
    """
    fn = "shared_curved_subspace"
    xs = jnp.asarray(xs)
    if xs.ndim != 4 or xs.shape[0] < 1:
        raise ValueError(
            f"{fn} expects a batch (N, H, W, C) of examples; got shape {tuple(xs.shape)}."
        )
    options = boundary.options_or_default(deepfool, "deepfool")
    x0, options = options.checked(fn, apply_fn, params, xs[0])
    if _checks.is_concrete(xs) and not bool(np.all(np.isfinite(np.asarray(xs)))):
        raise ValueError(f"{fn} got inputs with NaN or Inf values; clean them first.")
    m, num_matvecs = spectra.check_spectrum_args(fn, m, which, num_matvecs, x0.size)
    fd_scale, h = operators.check_fd_args(fn, fd_scale, h)
    resolved = operators.resolve_operator(operator, apply_fn, params, x0, fn)
    key = _default_key(key)
    b = _find_batch(
        apply_fn,
        params,
        xs,
        options,
        jnp.asarray(fd_scale, xs.dtype),
        jnp.asarray(0.0 if h is None else h, xs.dtype),
        key,
        operator=resolved,
    )
    ok = b.status == CONVERGED
    vals, vecs, residuals = _average_core(
        apply_fn,
        params,
        b.z,
        b.label,
        b.adv_label,
        ok,
        b.scale,
        _default_key(key),
        m=m,
        which=which,
        num_matvecs=num_matvecs,
        operator=resolved,
    )
    return SharedSubspace(
        basis=vecs,
        curvatures=vals,
        residuals=residuals,
        boundary_points=b.z,
        label=b.label,
        adv_label=b.adv_label,
        converged=ok,
        status=b.status,
        operator=jnp.asarray(OPERATORS.index(resolved), jnp.int32),
        scale=b.scale,
    )


def projection_ratio(r: jax.Array, basis: jax.Array) -> jax.Array:
    """``||P_S r|| / ||r||`` for one perturbation ``r`` and an orthonormal basis of S.

    The random baseline for an m-dimensional subspace of R^d is ``sqrt(m / d)``
    (``random_baseline``); a ratio far above it means the perturbation lives in S.

    Args:
      r: one image-shaped vector.
      basis: ``(m, H, W, C)`` with orthonormal flattened rows.
    """
    coeffs = jnp.tensordot(basis, r, axes=r.ndim)
    return operators.norm(coeffs) / operators.norm(r)


def random_baseline(m: int, d: int) -> float:
    """``sqrt(m / d)``: the expected ``||P_S r|| / ||r||`` for a random m-dim subspace."""
    return math.sqrt(m / d)
