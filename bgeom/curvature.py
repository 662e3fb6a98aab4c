"""Curvature of the decision boundary: principal curvatures, spectra, shared curved directions.

At a boundary point ``z = x + r(x)`` between the predicted class ``k0`` and the
adverse class ``j`` (``r`` from DeepFool, refined onto the boundary), let
``F = f_k0 - f_j``, ``n = grad F(z) / ||grad F(z)||`` and ``P = I - n n^T``. The
principal curvatures are the eigenvalues of ``P H_F(z) P / ||grad F(z)||`` on
the tangent space (``d - 1`` of them); the curvature along a unit tangent ``u``
is ``u^T H_F u / ||grad F||``. With this sign convention a positive curvature
bends the boundary towards the adverse class along ``u`` (``F`` grows on both
sides, so the class ``k0`` region is locally convex there) and a negative one
bends it towards ``k0``. See SPEC.md section 2.

Everything is matrix-free: Hessian-vector products (HVPs) of ``F`` with respect
to the input, then Lanczos from matfree (``decomp.tridiag_sym`` with full
reorthogonalisation, ``eig.eigh_partial``). A dense oracle (``jax.hessian`` +
``eigh``) exists for small inputs and tests.

Two HVP operators:

- ``"exact"``: forward-over-reverse autodiff, linearised once at ``z`` so each
  Lanczos step pays only the tangent pass. Meaningful for smooth activations
  (softplus, GELU, tanh, swish).
- ``"fd"``: central finite differences of gradients at a stated scale ``h``,
  ``H v ~ ||v|| [grad F(z + h u) - grad F(z - h u)] / 2h`` with ``u = v / ||v||``,
  as the original authors measured. It measures the boundary's bending at the
  scale ``h``; on a piecewise-linear network it is not exactly linear in ``v``,
  which the reported residuals expose.

The default ``"auto"``: ReLU networks (ReLU, max-pooling, affine and batch-norm
layers) are piecewise linear, so their exact input Hessian is zero almost
everywhere and an exact spectrum would be flat zeros, a wrong answer. ``auto``
inspects the traced Hessian-vector program once, at trace time: when its output
does not depend on the vector at all (the program is structurally zero, as for
every piecewise-linear bgeom model) it uses ``"fd"`` at ``h = fd_scale * ||z -
x||`` (a tenth of the distance to the boundary by default), otherwise
``"exact"``. Every result records the operator and scale it used. If a network
hides its piecewise linearity from that check and the exact spectrum comes
back identically zero, ``auto`` reports ``converged=False`` instead of a flat
spectrum.

References:
  Fawzi, Moosavi-Dezfooli, Frossard, Soatto. "Empirical study of the topology
  and geometry of deep networks" (first version: "Classification regions of
  deep neural networks"), CVPR 2018. https://arxiv.org/abs/1705.09552
  Lanczos, "An iteration method for the solution of the eigenvalue problem of
  linear differential and integral operators", 1950.
  Ubaru, Chen, Saad. "Fast estimation of tr(f(A)) via stochastic Lanczos
  quadrature", SIAM J. Matrix Anal. Appl. 2017. https://doi.org/10.1137/16M1104974
  Kraemer et al., matfree. https://github.com/pnkraemer/matfree
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from matfree import decomp, eig

from bgeom import _checks
from bgeom.margins import _check_margin_args, _deepfool_core

OPERATORS = ("exact", "fd")
"""Operator codes stored in results: ``OPERATORS[result.operator]`` is its name."""

WHICH = ("largest", "smallest", "both", "magnitude")

# Fraction of the distance to the boundary used as finite-difference scale by
# default: small enough to stay local, large enough to cross many ReLU kinks.
DEFAULT_FD_SCALE = 0.1
# Float32 cancellation in g(z + hu) - g(z - hu) grows like eps / h: never go below.
_MIN_H = 1e-4
# Illinois false-position steps that move the DeepFool point onto F = 0.
_REFINE_STEPS = 30
# Lanczos breaks down (0 / 0) when an operator product vanishes exactly, which
# finite differences on a ReLU network do whenever no unit changes state within
# +-h along the vector. A fixed diagonal of this size (times 1..2) is added to
# the tangent-space operator: far below the float32 resolution of any curvature
# that is not zero, it only lets the run continue (with Ritz values ~0) where
# the product is exactly zero.
_JITTER = 1e-10


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
        not identically zero.
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
      boundary_point, label, adv_label, converged, operator, scale: as in
        ``CurvatureResult``.
    """

    nodes: jax.Array
    weights: jax.Array
    boundary_point: jax.Array
    label: jax.Array
    adv_label: jax.Array
    converged: jax.Array
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
    operator: jax.Array
    scale: jax.Array


# ----------------------------------------------------------------- operators


def _pair_function(apply_fn: Callable, params: Any, label: jax.Array, adv_label: jax.Array):
    """``F(z) = f_label(z) - f_adv_label(z)``, the boundary function of the pair."""

    def F(z):
        logits = apply_fn(params, z)
        return logits[label] - logits[adv_label]

    return F


def _flat_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.vdot(a.ravel(), b.ravel())


def _norm(a: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(a)))


def hessian_vector_product(
    apply_fn: Callable,
    params: Any,
    z: jax.Array,
    label: jax.Array,
    adv_label: jax.Array,
    *,
    operator: str = "exact",
    h: float | jax.Array | None = None,
) -> Callable[[jax.Array], jax.Array]:
    """The map ``v -> H_F(z) v`` for ``F = f_label - f_adv_label``, one image-shaped ``v``.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters; traced.
      z: the point, shape (H, W, C).
      label, adv_label: the class pair of ``F``.
      operator: ``"exact"`` (forward-over-reverse autodiff, linearised once at
        ``z``: every further product costs one tangent pass) or ``"fd"``
        (central differences of gradients at scale ``h``:
        ``||v|| [grad F(z + h u) - grad F(z - h u)] / 2h``, ``u = v / ||v||``).
      h: the finite-difference scale (required for ``"fd"``).

    Returns:
      A function of one image-shaped vector; composes with jit and vmap.
    """
    F = _pair_function(apply_fn, params, label, adv_label)
    return _hvp_and_grad(F, z, operator, h)[0]


def _hvp_and_grad(F: Callable, z: jax.Array, operator: str, h: Any):
    grad_F = jax.grad(F)
    if operator == "exact":
        g, hvp = jax.linearize(grad_F, z)
        return hvp, g
    if operator != "fd":
        raise ValueError(f"Unknown operator {operator!r}; choose one of {', '.join(OPERATORS)}.")
    if h is None:
        raise ValueError("The finite-difference operator needs a scale h > 0.")
    g = grad_F(z)

    def hvp(v):
        nv = _norm(v)
        u = v / jnp.where(nv > 0, nv, 1.0)
        # Both gradients from one batched VJP: cheaper than two calls.
        g_plus, g_minus = jax.vmap(grad_F)(jnp.stack([z + h * u, z - h * u]))
        return nv * (g_plus - g_minus) / (2.0 * h)

    return hvp, g


def curvature_operator(
    apply_fn: Callable,
    params: Any,
    z: jax.Array,
    label: jax.Array,
    adv_label: jax.Array,
    *,
    operator: str = "exact",
    h: float | jax.Array | None = None,
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array, jax.Array]:
    """The shape operator ``A v = P H_F(z) P v / ||grad F(z)||`` of the boundary at ``z``.

    Args:
      apply_fn, params, z, label, adv_label, operator, h: as in
        ``hessian_vector_product``.

    Returns:
      ``(matvec, normal, grad_norm)``: ``matvec`` maps one image-shaped vector to
      one in the tangent space; its eigenvalues on the tangent space are the
      principal curvatures.

    References:
      Fawzi et al., CVPR 2018, section 4. https://arxiv.org/abs/1705.09552
    """
    F = _pair_function(apply_fn, params, label, adv_label)
    return _shape_operator(F, z, operator, h)


def _jitter_diagonal(like: jax.Array) -> jax.Array:
    """The fixed diagonal ``_JITTER * s`` with ``s`` in [1, 2) (see ``_JITTER``)."""
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    s = 1.0 + jnp.mod(jnp.arange(like.size, dtype=like.dtype) * golden, 1.0)
    return (_JITTER * s).reshape(like.shape)


def _shape_operator(F: Callable, z: jax.Array, operator: str, h: Any):
    hvp, g = _hvp_and_grad(F, z, operator, h)
    gnorm = _norm(g)
    n = g / jnp.where(gnorm > 0, gnorm, 1.0)

    def project(v):
        return v - n * _flat_dot(n, v)

    jitter = _jitter_diagonal(z)

    def matvec(v):
        # Project the input as well as the output: any rounding that leaked a
        # normal component into a Lanczos vector is removed before it is used.
        v = project(v)
        return project(hvp(v) / gnorm + jitter * v)

    return matvec, n, gnorm


# ------------------------------------------------------------ "auto" operator


def _output_depends_on_last_input(jaxpr: Any) -> bool:
    """Whether any output of ``jaxpr`` is computed from its last input (conservative)."""
    Literal = jax.extend.core.Literal
    live = {jaxpr.invars[-1]}
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in live for v in eqn.invars):
            live.update(eqn.outvars)
    return any(not isinstance(v, Literal) and v in live for v in jaxpr.outvars)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def has_zero_input_hessian(apply_fn: Callable, params: Any, x: jax.Array) -> bool:
    """True when the input Hessian of every logit difference is structurally zero.

    Decided at trace time, from shapes only (works under jit and vmap): the
    program computing ``H_F v`` is traced and checked for any dependence of its
    output on ``v``. Networks built from ReLU, max-pooling, affine and batch-norm
    (eval) layers are piecewise linear and pass; any smooth activation fails.
    A ``True`` is a proof (the product is constant, hence zero); a ``False`` for
    a piecewise-linear network written with unusual primitives is possible, and
    is caught later by ``auto`` as an identically zero spectrum.
    """
    num_classes = jax.eval_shape(apply_fn, _abstract(params), _abstract(x)).shape[0]
    j = 1 if num_classes > 1 else 0

    def hvp(p, z, v):
        def F(y):
            logits = apply_fn(p, y)
            return logits[0] - logits[j]

        return jax.jvp(jax.grad(F), (z,), (v,))[1]

    xa = _abstract(x)
    closed = jax.make_jaxpr(hvp)(_abstract(params), xa, xa)
    return not _output_depends_on_last_input(closed.jaxpr)


def _resolve_operator(operator: str, apply_fn: Callable, params: Any, x: jax.Array, fn: str):
    """The concrete operator (``exact``/``fd``) for a requested one (``auto`` too)."""
    if operator not in (*OPERATORS, "auto"):
        raise ValueError(f"{fn}: unknown operator {operator!r}; choose 'auto', 'exact' or 'fd'.")
    if operator == "fd":
        return "fd"
    flat = has_zero_input_hessian(apply_fn, params, x)
    if operator == "exact" and flat:
        raise ValueError(
            f"{fn}: this network is piecewise linear (ReLU / max-pooling), so its exact input "
            "Hessian is zero almost everywhere and every curvature would be 0. Use "
            "operator='fd' (finite differences at a scale h) or the default operator='auto'."
        )
    return "fd" if flat else "exact"


# ------------------------------------------------------------ boundary point


def _refine_onto_boundary(F: Callable, x: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move along the segment ``x + t p`` onto ``F = 0`` (Illinois false position).

    ``F(x) > 0`` and ``F(x + p) < 0`` bracket the root; false position with the
    Illinois modification converges superlinearly and keeps the bracket, so a
    fixed budget of forward passes suffices. Returns the point and whether the
    bracket was valid.
    """
    phi = lambda t: F(x + t * p)
    zero, one = jnp.asarray(0.0, x.dtype), jnp.asarray(1.0, x.dtype)
    f0, f1 = phi(zero), phi(one)
    ok = (f0 > 0) & (f1 < 0)
    tol = 1e-6 * (jnp.abs(f0) + jnp.abs(f1))

    # State: step, bracket [a, b] with F(a) > 0 > F(b) (Illinois-scaled values),
    # which side was kept last, and the latest iterate t with its value.
    def cond(s):
        i, a, _, b, _, _, t, ft = s
        return ok & (i < _REFINE_STEPS) & (jnp.abs(ft) > tol) & (b - a > 1e-7)

    def body(s):
        i, a, fa, b, fb, side, _, _ = s
        t = jnp.clip((a * fb - b * fa) / (fb - fa), a, b)
        ft = phi(t)
        left = ft > 0  # the root lies in [t, b]: t replaces a
        # Illinois: halve the end value kept twice in a row so both ends move.
        fa_kept = jnp.where(side == 1, fa / 2, fa)
        fb_kept = jnp.where(side == -1, fb / 2, fb)
        a, fa = jnp.where(left, t, a), jnp.where(left, ft, fa_kept)
        b, fb = jnp.where(left, b, t), jnp.where(left, fb_kept, ft)
        side = jnp.where(left, -1, 1)  # -1: b was kept, +1: a was kept
        return i + 1, a, fa, b, fb, side, t, ft

    init = (jnp.asarray(0, jnp.int32), zero, f0, one, f1, jnp.asarray(0, jnp.int32), one, f1)
    t = jax.lax.while_loop(cond, body, init)[6]
    return x + t * p, ok


class _Boundary(NamedTuple):
    z: jax.Array
    label: jax.Array
    adv_label: jax.Array
    distance: jax.Array
    ok: jax.Array


def _boundary_point(apply_fn, params, x, overshoot, candidates, max_iter) -> _Boundary:
    df = _deepfool_core(
        apply_fn,
        params,
        x,
        overshoot,
        None,
        project=None,
        candidates=candidates,
        max_iter=max_iter,
        bounds=None,
    )
    F = _pair_function(apply_fn, params, df.label, df.adv_label)
    z, bracket = _refine_onto_boundary(F, x, df.perturbation)
    return _Boundary(z, df.label, df.adv_label, _norm(z - x), df.converged & bracket)


# ------------------------------------------------------------------ Lanczos


def _default_num_matvecs(k: int, dim: int) -> int:
    return min(dim, max(2 * k + 20, 3 * k))


def _check_spectrum_args(fn: str, k: int, which: str, num_matvecs: int | None, dim: int):
    k = _checks.check_positive_int(k, "k", fn)
    if which not in WHICH:
        raise ValueError(f"{fn}: which must be one of {', '.join(WHICH)}; got {which!r}.")
    if k > dim:
        raise ValueError(
            f"{fn}: k={k} exceeds the {dim} dimensions of the tangent space; choose k <= {dim}."
        )
    if num_matvecs is None:
        num_matvecs = _default_num_matvecs(k, dim)
    num_matvecs = _checks.check_positive_int(num_matvecs, "num_matvecs", fn)
    if not k <= num_matvecs <= dim:
        raise ValueError(
            f"{fn}: num_matvecs (the Krylov depth) must be between k={k} and the tangent "
            f"dimension {dim}; got {num_matvecs}."
        )
    return k, num_matvecs


def _select(vals: jax.Array, k: int, which: str) -> jax.Array:
    """Indices of the wanted Ritz values (``vals`` ascending), in descending value order."""
    m = vals.shape[0]
    if which == "largest":
        idx = jnp.arange(m - 1, m - 1 - k, -1)
    elif which == "smallest":
        idx = jnp.arange(k - 1, -1, -1)
    elif which == "both":
        top = k - k // 2
        idx = jnp.concatenate([jnp.arange(m - 1, m - 1 - top, -1), jnp.arange(k // 2 - 1, -1, -1)])
    else:  # magnitude
        idx = jnp.argsort(-jnp.abs(vals))[:k]
        idx = idx[jnp.argsort(-vals[idx])]
    return idx


def _canonical_sign(vecs: jax.Array) -> jax.Array:
    """Flip each row so its largest-magnitude entry is positive (reproducible signs)."""
    flat = vecs.reshape(vecs.shape[0], -1)
    pivot = jnp.take_along_axis(flat, jnp.argmax(jnp.abs(flat), axis=1)[:, None], axis=1)
    return vecs * jnp.where(pivot < 0, -1.0, 1.0).reshape((-1,) + (1,) * (vecs.ndim - 1))


def _lanczos_eigs(matvec: Callable, v0: jax.Array, k: int, which: str, num_matvecs: int):
    """Top/bottom eigenpairs of a symmetric operator by matfree's Lanczos; explicit residuals."""
    tridiag = decomp.tridiag_sym(num_matvecs, reortho="full", materialize=True, custom_vjp=False)
    vals, vecs = eig.eigh_partial(tridiag)(matvec, v0)
    idx = _select(vals, k, which)
    vals, vecs = vals[idx], _canonical_sign(vecs[idx])
    # Residuals with the operator itself (k products, batched): an honest
    # accuracy measure even when the Lanczos estimate would be misleading
    # (loss of orthogonality, or the slightly nonlinear finite-difference map).
    applied = jax.vmap(matvec)(vecs)
    diff = applied - vals.reshape((-1,) + (1,) * (vecs.ndim - 1)) * vecs
    residuals = jnp.sqrt(jnp.sum(jnp.square(diff.reshape(k, -1)), axis=1))
    return vals, vecs, residuals


def _tangent_start(key: jax.Array, n: jax.Array) -> jax.Array:
    v = jax.random.normal(key, n.shape, n.dtype)
    return v - n * _flat_dot(n, v)


def _default_key(key: Any) -> jax.Array:
    return jax.random.PRNGKey(0) if key is None else key


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
    F = _pair_function(apply_fn, params, label, adv_label)
    matvec, n, gnorm = _shape_operator(F, z, operator, h)
    vals, vecs, residuals = _lanczos_eigs(matvec, _tangent_start(key, n), k, which, num_matvecs)
    finite = (
        jnp.all(jnp.isfinite(vals)) & jnp.all(jnp.isfinite(residuals)) & jnp.isfinite(gnorm)
    ) & (gnorm > 0)
    if auto and operator == "exact":
        # An exact spectrum at the jitter's level is a hidden piecewise-linear net.
        finite = finite & jnp.any(jnp.abs(vals) > 1e3 * _JITTER)
    return vals, vecs, n, residuals, finite


@functools.partial(
    jax.jit,
    static_argnames=(
        "apply_fn",
        "k",
        "which",
        "num_matvecs",
        "operator",
        "auto",
        "candidates",
        "max_iter",
    ),
)
def _boundary_curvature_core(
    apply_fn,
    params,
    x,
    overshoot,
    fd_scale,
    h,
    key,
    *,
    k,
    which,
    num_matvecs,
    operator,
    auto,
    candidates,
    max_iter,
):
    b = _boundary_point(apply_fn, params, x, overshoot, candidates, max_iter)
    scale = _fd_scale(operator, h, fd_scale, b.distance, x.dtype)
    vals, vecs, n, residuals, finite = _principal_curvatures_core(
        apply_fn,
        params,
        b.z,
        b.label,
        b.adv_label,
        scale,
        key,
        k=k,
        which=which,
        num_matvecs=num_matvecs,
        operator=operator,
        auto=auto,
    )
    return CurvatureResult(
        curvatures=vals,
        directions=vecs,
        boundary_point=b.z,
        normal=n,
        residuals=residuals,
        label=b.label,
        adv_label=b.adv_label,
        converged=b.ok & finite,
        operator=jnp.asarray(OPERATORS.index(operator), jnp.int32),
        scale=scale,
    )


def _fd_scale(operator, h, fd_scale, distance, dtype):
    """The finite-difference scale: ``h`` if positive, else ``fd_scale * distance``."""
    if operator == "exact":
        return jnp.zeros((), dtype)
    relative = jnp.maximum(fd_scale * distance, _MIN_H)
    return jnp.where(h > 0, h, relative).astype(dtype)


def _check_fd_args(fn: str, fd_scale: float, h: float | None) -> tuple[float, float]:
    fd_scale = _checks.check_nonnegative_float(fd_scale, "fd_scale", fn)
    if fd_scale == 0:
        raise ValueError(f"{fn}: fd_scale must be > 0 (the scale is fd_scale * distance).")
    if h is not None:
        h = _checks.check_nonnegative_float(h, "h", fn)
        if h == 0:
            raise ValueError(f"{fn}: the finite-difference scale h must be > 0.")
    return fd_scale, h


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
    candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 50,
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
      fd_scale: finite-difference scale relative to the distance ``||z - x||``
        to the boundary (``h = fd_scale * ||z - x||``, at least 1e-4).
      h: an absolute finite-difference scale instead (overrides ``fd_scale``).
      key: PRNG key of the Lanczos start vector (default: a fixed key).
      candidates, overshoot, max_iter: DeepFool's options (``bgeom.deepfool``).

    Returns:
      ``CurvatureResult``; ``converged=False`` (never an exception) when DeepFool
      did not flip the label or the spectrum is not finite.

    References:
      Fawzi, Moosavi-Dezfooli, Frossard, Soatto. "Empirical study of the topology
      and geometry of deep networks", CVPR 2018. https://arxiv.org/abs/1705.09552
    """
    fn = "boundary_curvature"
    x, candidates, _ = _check_margin_args(
        fn, apply_fn, params, x, candidates, overshoot, max_iter, None
    )
    dim = x.size - 1
    k, num_matvecs = _check_spectrum_args(fn, k, which, num_matvecs, dim)
    fd_scale, h = _check_fd_args(fn, fd_scale, h)
    resolved = _resolve_operator(operator, apply_fn, params, x, fn)
    return _boundary_curvature_core(
        apply_fn,
        params,
        x,
        jnp.asarray(overshoot, x.dtype),
        jnp.asarray(fd_scale, x.dtype),
        jnp.asarray(0.0 if h is None else h, x.dtype),
        _default_key(key),
        k=k,
        which=which,
        num_matvecs=num_matvecs,
        operator=resolved,
        auto=operator == "auto",
        candidates=candidates,
        max_iter=max_iter,
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
      every number is finite.
    """
    fn = "principal_curvatures"
    z = _checks.check_example(z, fn)
    num_classes = _checks.check_logits(apply_fn, params, z, fn)
    for name, c in (("label", label), ("adv_label", adv_label)):
        if _checks.is_concrete(c) and not 0 <= int(c) < num_classes:
            raise ValueError(f"{fn}: {name} must be a class index in [0, {num_classes}).")
    k, num_matvecs = _check_spectrum_args(fn, k, which, num_matvecs, z.size - 1)
    if operator not in OPERATORS:
        raise ValueError(f"{fn}: operator must be 'exact' or 'fd'; got {operator!r}.")
    _, h = _check_fd_args(fn, 1.0, h)
    if operator == "fd" and h is None:
        raise ValueError(f"{fn}: operator='fd' needs a finite-difference scale h > 0.")
    _resolve_operator(operator, apply_fn, params, z, fn)
    label = jnp.asarray(label, jnp.int32)
    adv_label = jnp.asarray(adv_label, jnp.int32)
    scale = jnp.asarray(0.0 if operator == "exact" else h, z.dtype)
    vals, vecs, n, residuals, finite = _principal_curvatures_core(
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
        converged=finite,
        operator=jnp.asarray(OPERATORS.index(operator), jnp.int32),
        scale=scale,
    )


# -------------------------------------------------------------- dense oracle


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
    F = _pair_function(apply_fn, params, label, adv_label)
    d = z.size
    g = jax.grad(F)(z).ravel()
    gnorm = _norm(g)
    n = g / gnorm
    if operator == "exact":
        H = jax.hessian(F)(z).reshape(d, d)
    else:
        hvp, _ = _hvp_and_grad(F, z, operator, h)
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
        vals[::-1], _canonical_sign(dirs.reshape(d - 1, *z.shape)), n.reshape(z.shape)
    )


# ------------------------------------------------- spectral density (SLQ)


@functools.partial(
    jax.jit,
    static_argnames=(
        "apply_fn",
        "num_probes",
        "num_matvecs",
        "operator",
        "candidates",
        "max_iter",
    ),
)
def _density_core(
    apply_fn,
    params,
    x,
    key,
    overshoot,
    fd_scale,
    h,
    *,
    num_probes,
    num_matvecs,
    operator,
    candidates,
    max_iter,
):
    b = _boundary_point(apply_fn, params, x, overshoot, candidates, max_iter)
    scale = _fd_scale(operator, h, fd_scale, b.distance, x.dtype)
    F = _pair_function(apply_fn, params, b.label, b.adv_label)
    matvec, n, gnorm = _shape_operator(F, b.z, operator, scale)
    tridiag = decomp.tridiag_sym(num_matvecs, reortho="full", materialize=True, custom_vjp=False)

    def one_probe(k):
        # Gaussian probes projected onto the tangent space and normalised are
        # uniform on its unit sphere, so E[(u . q_i)^2] = 1 / (d - 1) exactly:
        # the quadrature weights estimate the spectral measure without bias.
        v0 = _tangent_start(k, n)
        T = tridiag(matvec, v0).J_small
        nodes, vecs = jnp.linalg.eigh(T)
        return nodes, jnp.square(vecs[0, :])

    nodes, weights = jax.vmap(one_probe)(jax.random.split(key, num_probes))
    finite = jnp.all(jnp.isfinite(nodes)) & jnp.all(jnp.isfinite(weights)) & (gnorm > 0)
    return CurvatureDensity(
        nodes=nodes,
        weights=weights,
        boundary_point=b.z,
        label=b.label,
        adv_label=b.adv_label,
        converged=b.ok & finite,
        operator=jnp.asarray(OPERATORS.index(operator), jnp.int32),
        scale=scale,
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
    candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 50,
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
      operator, fd_scale, h, candidates, overshoot, max_iter: as in
        ``boundary_curvature``.

    Returns:
      ``CurvatureDensity``; smooth it with ``spectral_density``.

    References:
      Ubaru, Chen, Saad, SIAM J. Matrix Anal. Appl. 38(4), 2017.
      https://doi.org/10.1137/16M1104974 ; Ghorbani, Krishnan, Xiao, "An
      investigation into neural net optimization via Hessian eigenvalue
      density", ICML 2019. https://arxiv.org/abs/1901.10159
    """
    fn = "curvature_density"
    x, candidates, _ = _check_margin_args(
        fn, apply_fn, params, x, candidates, overshoot, max_iter, None
    )
    num_probes = _checks.check_positive_int(num_probes, "num_probes", fn)
    num_matvecs = _checks.check_positive_int(num_matvecs, "num_matvecs", fn)
    if num_matvecs > x.size - 1:
        raise ValueError(f"{fn}: num_matvecs must be <= d - 1 = {x.size - 1}.")
    fd_scale, h = _check_fd_args(fn, fd_scale, h)
    resolved = _resolve_operator(operator, apply_fn, params, x, fn)
    return _density_core(
        apply_fn,
        params,
        x,
        key,
        jnp.asarray(overshoot, x.dtype),
        jnp.asarray(fd_scale, x.dtype),
        jnp.asarray(0.0 if h is None else h, x.dtype),
        num_probes=num_probes,
        num_matvecs=num_matvecs,
        operator=resolved,
        candidates=candidates,
        max_iter=max_iter,
    )


def spectral_density(
    nodes: jax.Array, weights: jax.Array, grid: jax.Array, width: float | jax.Array
) -> jax.Array:
    """Gaussian-smoothed density on ``grid`` of the quadrature ``(nodes, weights)``.

    ``rho(t) = mean_l sum_j w_lj N(t; nodes_lj, width^2)``; integrates to 1 when
    each probe's weights sum to 1. Leading axes beyond the last are averaged
    (pass a batch of ``CurvatureDensity`` fields to pool several points).

    Args:
      nodes, weights: same shape ``(..., m)``.
      grid: ``(G,)`` curvature values.
      width: the Gaussian's standard deviation (curvature units).

    Returns:
      ``(G,)`` density values.
    """
    nodes = jnp.asarray(nodes).reshape(-1)
    weights = jnp.asarray(weights).reshape(-1)
    probes = jnp.sum(weights)
    z = (jnp.asarray(grid)[:, None] - nodes[None, :]) / width
    kernel = jnp.exp(-0.5 * z * z) / (width * math.sqrt(2 * math.pi))
    return kernel @ weights / probes


# ------------------------------------------------- shared curved subspace


@functools.partial(jax.jit, static_argnames=("apply_fn", "operator", "candidates", "max_iter"))
def _boundary_batch(
    apply_fn, params, xs, overshoot, fd_scale, h, *, operator, candidates, max_iter
):
    b = jax.vmap(lambda x: _boundary_point(apply_fn, params, x, overshoot, candidates, max_iter))(
        xs
    )
    scales = jax.vmap(lambda dist: _fd_scale(operator, h, fd_scale, dist, xs.dtype))(b.distance)
    return b, scales


@functools.partial(jax.jit, static_argnames=("apply_fn", "m", "which", "num_matvecs", "operator"))
def _average_core(
    apply_fn, params, zs, labels, adv_labels, ok, scales, key, *, m, which, num_matvecs, operator
):
    count = jnp.maximum(jnp.sum(ok.astype(zs.dtype)), 1.0)

    def averaged(v):
        # One batched product over all points: each point's shape operator,
        # masked to the points whose boundary was found, then averaged.
        def one(z, label, adv, scale):
            F = _pair_function(apply_fn, params, label, adv)
            return _shape_operator(F, z, operator, scale)[0](v)

        out = jax.vmap(one)(zs, labels, adv_labels, scales)
        out = jnp.where(ok.reshape((-1,) + (1,) * v.ndim), out, 0.0)
        return jnp.sum(out, axis=0) / count

    v0 = jax.random.normal(key, zs.shape[1:], zs.dtype)
    vals, vecs, residuals = _lanczos_eigs(averaged, v0, m, which, num_matvecs)
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
    m, num_matvecs = _check_spectrum_args(fn, m, which, num_matvecs, zs[0].size)
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
    candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 50,
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
      operator, fd_scale, h, key, candidates, overshoot, max_iter: as in
        ``boundary_curvature`` (``auto`` decides once for the network).

    Returns:
      ``SharedSubspace``; ``bgeom.subspaces.from_basis(result.basis)`` is the
      subspace S for ``bgeom.subspace_deepfool``.

    References:
      Fawzi et al., CVPR 2018, section 5 (curvature and vulnerability).
      https://arxiv.org/abs/1705.09552
    """
    fn = "shared_curved_subspace"
    xs = jnp.asarray(xs)
    if xs.ndim != 4 or xs.shape[0] < 1:
        raise ValueError(
            f"{fn} expects a batch (N, H, W, C) of examples; got shape {tuple(xs.shape)}."
        )
    x0, candidates, _ = _check_margin_args(
        fn, apply_fn, params, xs[0], candidates, overshoot, max_iter, None
    )
    if _checks.is_concrete(xs) and not bool(np.all(np.isfinite(np.asarray(xs)))):
        raise ValueError(f"{fn} got inputs with NaN or Inf values; clean them first.")
    m, num_matvecs = _check_spectrum_args(fn, m, which, num_matvecs, x0.size)
    fd_scale, h = _check_fd_args(fn, fd_scale, h)
    resolved = _resolve_operator(operator, apply_fn, params, x0, fn)
    b, scales = _boundary_batch(
        apply_fn,
        params,
        xs,
        jnp.asarray(overshoot, xs.dtype),
        jnp.asarray(fd_scale, xs.dtype),
        jnp.asarray(0.0 if h is None else h, xs.dtype),
        operator=resolved,
        candidates=candidates,
        max_iter=max_iter,
    )
    vals, vecs, residuals = _average_core(
        apply_fn,
        params,
        b.z,
        b.label,
        b.adv_label,
        b.ok,
        scales,
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
        converged=b.ok,
        operator=jnp.asarray(OPERATORS.index(resolved), jnp.int32),
        scale=scales,
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
    return _norm(coeffs) / _norm(r)


def random_baseline(m: int, d: int) -> float:
    """``sqrt(m / d)``: the expected ``||P_S r|| / ||r||`` for a random m-dim subspace."""
    return math.sqrt(m / d)
