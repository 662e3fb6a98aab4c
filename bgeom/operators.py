"""Curvature operators of a decision boundary: Hessian-vector products and the shape operator.

For a class pair, ``F = f_label - f_adv``. At a point ``z`` with unit normal
``n = grad F / ||grad F||`` and tangent projector ``P = I - n n^T``, the shape
operator is ``A v = P H_F(z) P v / ||grad F(z)||``; its eigenvalues on the
tangent space are the principal curvatures (``bgeom.curvature``).

Two Hessian-vector products:

- ``"exact"``: forward-over-reverse autodiff, linearised once at ``z`` so each
  product pays only the tangent pass. Meaningful for smooth activations
  (softplus, GELU, tanh, swish).
- ``"fd"``: central finite differences of gradients at a stated scale ``h``,
  ``H v ~ ||v|| [grad F(z + h u) - grad F(z - h u)] / 2h`` with ``u = v / ||v||``,
  as the original authors measured. It measures the boundary's bending at
  the scale ``h``; on a piecewise-linear network it is not exactly linear in
  ``v``.

``resolve_operator`` turns ``"auto"`` into one of them: ReLU networks are
piecewise linear, so their exact input Hessian is zero almost everywhere;
``has_zero_input_hessian`` proves that from the traced Hessian-vector program
(its output does not depend on the vector) and ``auto`` then uses ``"fd"``.
See docs/curvature.md.

References:
  Fawzi, Moosavi-Dezfooli, Frossard, Soatto. "Empirical study of the topology
  and geometry of deep networks", CVPR 2018. https://arxiv.org/abs/1705.09552
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp

from bgeom import _checks, boundary

OPERATORS = ("exact", "fd")
"""Operator codes stored in results: ``OPERATORS[result.operator]`` is its name."""

# Fraction of the distance to the boundary used as finite-difference scale by
# default: small enough to stay local, large enough to cross many ReLU kinks.
DEFAULT_FD_SCALE = 0.1
# Float32 cancellation in g(z + hu) - g(z - hu) grows like eps / h: never go below.
MIN_H = 1e-4
# Lanczos breaks down (0 / 0) when an operator product vanishes exactly, which
# finite differences on a ReLU network do whenever no unit changes state within
# +-h along the vector. A fixed diagonal of this size (times 1..2) is added to
# the tangent-space operator: far below the float32 resolution of any curvature
# that is not zero, it only lets the run continue (with Ritz values ~0) where
# the product is exactly zero.
JITTER = 1e-10


def flat_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """The Euclidean inner product of two arrays of the same shape."""
    return jnp.vdot(a.ravel(), b.ravel())


def norm(a: jax.Array) -> jax.Array:
    """The Euclidean (Frobenius) norm of an array of any shape."""
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
    F = boundary.pair_function(apply_fn, params, label, adv_label)
    return hvp_and_grad(F, z, operator, h)[0]


def hvp_and_grad(F: Callable, z: jax.Array, operator: str, h: Any):
    """``(v -> H_F(z) v, grad F(z))`` for a scalar ``F`` (see ``hessian_vector_product``)."""
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
        nv = norm(v)
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
      Method page: docs/curvature.md.
      Fawzi et al., CVPR 2018, section 4. https://arxiv.org/abs/1705.09552
    """
    F = boundary.pair_function(apply_fn, params, label, adv_label)
    return shape_operator(F, z, operator, h)


def jitter_diagonal(like: jax.Array) -> jax.Array:
    """The fixed diagonal ``JITTER * s`` with ``s`` in [1, 2) (see ``JITTER``)."""
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    s = 1.0 + jnp.mod(jnp.arange(like.size, dtype=like.dtype) * golden, 1.0)
    return (JITTER * s).reshape(like.shape)


def shape_operator(F: Callable, z: jax.Array, operator: str, h: Any):
    """``(matvec, n, ||grad F||)`` of the level set of ``F`` through ``z`` (``curvature_operator``).

    ``matvec`` projects its input and output onto the tangent space and adds
    the fixed ``jitter_diagonal`` (see ``JITTER``).
    """
    hvp, g = hvp_and_grad(F, z, operator, h)
    gnorm = norm(g)
    n = g / jnp.where(gnorm > 0, gnorm, 1.0)

    def project(v):
        return v - n * flat_dot(n, v)

    jitter = jitter_diagonal(z)

    def matvec(v):
        # Project the input as well as the output: any rounding that leaked a
        # normal component into a Lanczos vector is removed before it is used.
        v = project(v)
        return project(hvp(v) / gnorm + jitter * v)

    return matvec, n, gnorm


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


def resolve_operator(operator: str, apply_fn: Callable, params: Any, x: jax.Array, fn: str):
    """The concrete operator (``exact``/``fd``) for a requested one (``auto`` too).

    Raises ``ValueError`` for an unknown name, and for ``exact`` on a network
    whose input Hessian is structurally zero.
    """
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


# How the finite-difference scale is chosen on a piecewise-linear network (see
# ``finite_difference_scale``): the operator at scale h is flat (exactly zero)
# when no unit changes state within +-h, so h starts at fd_scale x the distance
# to the boundary and doubles while the gradient changes by less than
# FLAT_TOLERANCE (relative) across +-h along most probe directions, up to
# MAX_FD_SCALE x the distance (beyond that the bending is no longer local).
FLAT_TOLERANCE = 1e-2
MAX_FD_SCALE = 2.0
SCALE_PROBES = 4


def bending(grad_F: Callable, z: jax.Array, g: jax.Array, h: jax.Array, probes: jax.Array):
    """The relative gradient change ``||grad F(z + h u) - grad F(z - h u)|| / (2 ||grad F(z)||)``.

    Its median over the unit ``probes`` (the upper one: at least half of the
    probes see at least this change): zero when the finite-difference operator
    at scale ``h`` vanishes along most directions, as on a ReLU net when no
    unit changes state within ``+-h``.
    """
    both = jax.vmap(grad_F)(jnp.concatenate([z + h * probes, z - h * probes]))
    plus, minus = jnp.split(both, 2)
    change = jnp.sqrt(jnp.sum(jnp.square((plus - minus).reshape(len(probes), -1)), axis=1))
    return jnp.sort(change)[len(probes) // 2] / (2.0 * norm(g))


class Scale(NamedTuple):
    """The finite-difference scale of one boundary point.

    Attributes:
      h: the scale used (0 for exact HVPs).
      flat: the operator is flat at ``h``: along most probe directions the
        gradient changes by less than ``FLAT_TOLERANCE`` across ``+-h``.
    """

    h: jax.Array
    flat: jax.Array


def finite_difference_scale(
    operator: str,
    F: Callable,
    z: jax.Array,
    key: jax.Array,
    h: jax.Array,
    fd_scale: jax.Array,
    distance: jax.Array,
) -> Scale:
    """The scale ``h`` at which the finite-difference operator sees the boundary bend.

    A given ``h > 0`` is used as is. Otherwise ``h`` starts at
    ``max(fd_scale * distance, MIN_H)`` and doubles while the operator is flat
    there (no unit of a piecewise-linear network changes state within ``+-h``
    along most of ``SCALE_PROBES`` random tangent directions), up to
    ``MAX_FD_SCALE * distance``. ``flat`` reports an operator still flat at the
    final scale: its spectrum would be zeros, which is not a result.
    """
    dtype = z.dtype
    if operator == "exact":
        return Scale(jnp.zeros((), dtype), jnp.asarray(False))
    grad_F = jax.grad(F)
    g = grad_F(z)
    n = g / jnp.where(norm(g) > 0, norm(g), 1.0)
    probes = jax.vmap(lambda k: tangent_start(k, n))(jax.random.split(key, SCALE_PROBES))
    probes = probes / jax.vmap(norm)(probes).reshape((-1,) + (1,) * z.ndim)
    given = h > 0
    start = jnp.where(given, h, jnp.maximum(fd_scale * distance, MIN_H)).astype(dtype)
    top = jnp.maximum(MAX_FD_SCALE * distance, start).astype(dtype)
    flat_at = lambda s: bending(grad_F, z, g, s, probes) < FLAT_TOLERANCE

    def grow(s: Scale) -> Scale:
        scale = jnp.minimum(2.0 * s.h, top)
        return Scale(scale, flat_at(scale))

    first = Scale(start, flat_at(start))
    final = jax.lax.while_loop(lambda s: s.flat & ~given & (s.h < top), grow, first)
    return final


def check_fd_args(fn: str, fd_scale: float, h: float | None) -> tuple[float, float]:
    """Validate a relative scale ``fd_scale > 0`` and an optional absolute ``h > 0``."""
    fd_scale = _checks.check_nonnegative_float(fd_scale, "fd_scale", fn)
    if fd_scale == 0:
        raise ValueError(f"{fn}: fd_scale must be > 0 (the scale is fd_scale * distance).")
    if h is not None:
        h = _checks.check_nonnegative_float(h, "h", fn)
        if h == 0:
            raise ValueError(f"{fn}: the finite-difference scale h must be > 0.")
    return fd_scale, h


def tangent_start(key: jax.Array, n: jax.Array) -> jax.Array:
    """A Gaussian random vector projected onto the tangent space of the unit normal ``n``."""
    v = jax.random.normal(key, n.shape, n.dtype)
    return v - n * flat_dot(n, v)
