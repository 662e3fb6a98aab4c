"""SparseFool: sparse adversarial perturbations from the geometry of the boundary.

Modas, Moosavi-Dezfooli and Frossard (CVPR 2019) observe that the decision
boundary near an image is nearly flat, so a perturbation that changes few
pixels can be found by a linear program on its tangent hyperplane. From
``x_0`` with label ``k0``, with the box ``[lb, ub]`` (``bounds`` intersected
with ``x_0 +- delta``), each outer iteration:

1. finds the boundary point ``z`` near the current ``x_i`` and its unit normal
   ``w`` (``bgeom.boundary_point``: DeepFool, refined onto the boundary);
2. moves the hyperplane's anchor ``lambda_`` times further out,
   ``x_B = x_i + lambda_ (z - x_i)``;
3. runs the greedy linear solver from ``x_i`` towards the hyperplane
   ``w . (x - x_B) = 0`` inside the box (``linear_solver``);
4. tests ``x_adv = clip(x_0 + (1 + epsilon)(x_i - x_0), lb, ub)``.

It stops when the label of ``x_adv`` differs from ``k0``, or after
``max_iter`` iterations. The greedy solver takes the coordinates in order of
``|w_j|`` and moves each onto the hyperplane or to the box's edge; it is
vectorised here as a sort and a cumulative sum of every coordinate's
reachable change (no loop over pixels), with the same coordinates and values
as the greedy loop.

Differences from the authors' code, by design: the boundary point is refined
onto ``F = 0`` and its normal is the unit gradient there (the reference takes
the raw gradient at the un-refined DeepFool point), so the solver's bias
``beta = 0.001`` is a distance in input units; DeepFool linearises at the
overshot point as everywhere in bgeom (``docs/margins.md``). See
docs/sparsefool.md.

References:
  Modas, Moosavi-Dezfooli, Frossard. "SparseFool: a few pixels make a big
  difference", CVPR 2019. https://arxiv.org/abs/1811.02248
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bgeom import _checks, boundary, engine

# ``SparseResult.status`` codes (index into STATUS_NAMES).
CONVERGED = 0  # the label of x_adv differs from the clean label
MAX_ITER = 1  # max_iter outer iterations without a flip
BOUNDARY_FAILED = 2  # no boundary point was found from the current x_i
NONFINITE = 3  # NaN/Inf logits
STATUS_NAMES = ("converged", "max_iter", "boundary_failed", "nonfinite")

# The solver's bias (the reference's 0.001 sign(f)) and its least coordinate step.
SOLVER_BIAS = 1e-3
MIN_STEP = 1e-4


class SparseResult(NamedTuple):
    """A sparse perturbation of ONE image.

    Attributes:
      perturbation: ``x_adv - x_0``, shape of ``x``; zero outside the changed pixels.
      label: the model's prediction at ``x_0``.
      adv_label: the prediction at ``x_0 + perturbation``.
      iterations: outer iterations (each one boundary point and one linear solve).
      converged: ``adv_label != label`` and every number finite (``status == 0``).
      status: why it stopped, an index into ``STATUS_NAMES``.
      pixels_changed: the fraction of pixels changed (a pixel counts once,
        whatever its channels).
    """

    perturbation: jax.Array
    label: jax.Array
    adv_label: jax.Array
    iterations: jax.Array
    converged: jax.Array
    status: jax.Array
    pixels_changed: jax.Array


def linear_solver(
    x: jax.Array, w: jax.Array, x_b: jax.Array, lb: jax.Array, ub: jax.Array
) -> jax.Array:
    """The greedy coordinate solver of SparseFool towards ``w . (x - x_b) = 0`` in ``[lb, ub]``.

    The greedy loop: with ``f = w . (x - x_b)`` and the bias
    ``beta = 0.001 sign(f)``, repeatedly take the coordinate ``j`` with the
    largest ``|w_j|`` not taken yet, step it by
    ``max(|f + beta| / |w_j|, 1e-4) sign(w_j)`` (towards the hyperplane when
    ``w`` points from ``x`` to it, as a boundary normal does), clip it to the
    box, and stop once ``w . (x - x_b)`` has changed sign or every coordinate
    with ``w_j != 0`` is taken. That is the regime ``f < 0`` (``x`` on the
    near side of the hyperplane, which the boundary normal points away from);
    for ``f >= 0`` the point is returned unchanged. Vectorised: every coordinate taken before the
    last goes to its box edge (had it not, the sign would already have
    flipped), so the coordinates in order of ``|w_j|`` contribute their
    reachable change ``C_j = |w_j| room_j`` until a prefix sum reaches
    ``|f|``; the last one moves by what is left. Ties in ``|w_j|`` go to the
    lower flat index, as ``argmax`` does.

    Args:
      x: the starting point (inside the box).
      w: the hyperplane's normal, shape of ``x``.
      x_b: a point of the hyperplane.
      lb, ub: the box, shape of ``x`` (or broadcastable).

    Returns:
      The new point, shape of ``x``.
    """
    shape = x.shape
    x, w, x_b = x.ravel(), w.ravel(), x_b.ravel()
    lb, ub = (jnp.broadcast_to(b, shape).ravel() for b in (lb, ub))
    f0 = jnp.dot(w, x - x_b)
    need = jnp.abs(f0) + SOLVER_BIAS  # |f + beta|: beta has the sign of f
    order = jnp.argsort(-jnp.abs(w), stable=True)
    w_o, x_o = w[order], x[order]
    aw = jnp.abs(w_o)
    room = jnp.where(w_o > 0, ub[order] - x_o, x_o - lb[order])  # how far sign(w_j) can go
    cap = aw * jnp.maximum(room, 0.0)  # reachable change of w . x
    before = jnp.cumsum(cap) - cap  # change of every earlier coordinate, each at its edge
    left = need - before
    change = jnp.minimum(jnp.maximum(left, MIN_STEP * aw), cap)
    usable = aw > 0
    stops = usable & (before + change >= jnp.abs(f0))
    last = jnp.where(jnp.any(stops), jnp.argmax(stops), w.size)
    index = jnp.arange(w.size)
    moved = jnp.where(index < last, cap, jnp.where(index == last, change, 0.0))
    moved = jnp.where(usable, moved, 0.0)
    step = jnp.sign(w_o) * moved / jnp.where(usable, aw, 1.0)
    new = jnp.clip(x_o + step, lb[order], ub[order])
    new = jnp.zeros_like(x).at[order].set(new)
    # Already on the hyperplane's far side (or on it): nothing to solve. (The
    # greedy loop would push every coordinate further away instead.)
    return jnp.where(f0 < 0, new, x).reshape(shape)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "deepfool", "lambda_", "epsilon", "delta"],
    meta_fields=["max_iter", "bounds"],
)
@dataclasses.dataclass(frozen=True)
class Settings:
    """What every image of a SparseFool run shares (a pytree; loop bound and box static)."""

    params: Any
    deepfool: boundary.DeepFoolOptions
    lambda_: jax.Array
    epsilon: jax.Array
    delta: Any  # per-pixel change limit (None: the whole box)
    max_iter: int
    bounds: tuple[float, float]


class _State(NamedTuple):
    x0: jax.Array
    lb: jax.Array
    ub: jax.Array
    label: jax.Array
    x: jax.Array  # x_i
    adv: jax.Array  # x_adv of the last iteration
    adv_label: jax.Array
    iterations: jax.Array
    found: jax.Array  # the last boundary point converged
    finite: jax.Array


def _box(c: Settings, x0: jax.Array) -> tuple[jax.Array, jax.Array]:
    lb, ub = jnp.full_like(x0, c.bounds[0]), jnp.full_like(x0, c.bounds[1])
    if c.delta is None:
        return lb, ub
    return jnp.maximum(lb, x0 - c.delta), jnp.minimum(ub, x0 + c.delta)


@functools.lru_cache(maxsize=64)
def sparsefool_iterative(apply_fn: Callable) -> engine.Iterative:
    """SparseFool as an ``engine.Iterative``: one outer iteration per step; example ``(x,)``."""
    point = boundary.boundary_point_iterative(apply_fn, False)

    def init(c: Settings, x0: jax.Array) -> _State:
        logits = apply_fn(c.params, x0)
        label = jnp.argmax(logits)
        lb, ub = _box(c, x0)
        true = jnp.asarray(True)
        zero = jnp.asarray(0, jnp.int32)
        finite = jnp.all(jnp.isfinite(logits))
        return _State(x0, lb, ub, label, x0, x0, label, zero, true, finite)

    def step(c: Settings, s: _State) -> _State:
        bp = engine.loop(point, boundary.Shared(c.params, c.deepfool), s.x)
        x_b = s.x + c.lambda_ * (bp.point - s.x)
        x_new = linear_solver(s.x, bp.normal, x_b, s.lb, s.ub)
        x_new = jnp.where(bp.converged, x_new, s.x)
        adv = jnp.clip(s.x0 + (1.0 + c.epsilon) * (x_new - s.x0), s.lb, s.ub)
        logits = apply_fn(c.params, adv)
        return s._replace(
            x=x_new,
            adv=adv,
            adv_label=jnp.argmax(logits),
            iterations=s.iterations + 1,
            found=bp.converged,
            finite=s.finite & jnp.all(jnp.isfinite(logits)),
        )

    def running(c: Settings, s: _State) -> jax.Array:
        flipped = s.adv_label != s.label
        return ~flipped & (s.iterations < c.max_iter) & s.found & s.finite

    def finish(c: Settings, s: _State) -> SparseResult:
        flipped = s.adv_label != s.label
        status = jnp.where(s.found, MAX_ITER, BOUNDARY_FAILED)
        status = jnp.where(flipped, CONVERGED, status)
        status = jnp.where(s.finite, status, NONFINITE).astype(jnp.int32)
        r = s.adv - s.x0
        changed = jnp.any(r != 0, axis=-1) if r.ndim == 3 else r != 0
        return SparseResult(
            perturbation=r,
            label=s.label.astype(jnp.int32),
            adv_label=s.adv_label.astype(jnp.int32),
            iterations=s.iterations,
            converged=status == CONVERGED,
            status=status,
            pixels_changed=jnp.mean(changed.astype(r.dtype)),
        )

    return engine.Iterative(init, step, running, finish)


def _settings(
    fn: str,
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    *,
    lambda_: float,
    max_iter: int,
    epsilon: float,
    bounds: tuple[float, float],
    delta: float | None,
    candidates: int,
    overshoot: float,
    deepfool_max_iter: int,
) -> tuple[jax.Array, Settings]:
    """Validate SparseFool's arguments for ``fn`` (with ``x`` one example); the settings."""
    options = boundary.DeepFoolOptions(candidates, overshoot, deepfool_max_iter, None)
    x, options = options.checked(fn, apply_fn, params, x)
    lambda_ = _checks.check_nonnegative_float(lambda_, "lambda_", fn)
    if lambda_ <= 0:
        raise ValueError(f"{fn}: lambda_ must be > 0 (the reference uses 3); got {lambda_}.")
    epsilon = _checks.check_nonnegative_float(epsilon, "epsilon", fn)
    max_iter = _checks.check_positive_int(max_iter, "max_iter", fn, minimum=0)
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: bounds must be a pair (low, high), e.g. (0.0, 1.0).") from None
    if not lo < hi:
        raise ValueError(f"{fn}: bounds must satisfy low < high; got {bounds}.")
    if delta is not None:
        delta = _checks.check_nonnegative_float(delta, "delta", fn)
    return x, Settings(
        params=params,
        deepfool=options,
        lambda_=jnp.asarray(lambda_, x.dtype),
        epsilon=jnp.asarray(epsilon, x.dtype),
        delta=None if delta is None else jnp.asarray(delta, x.dtype),
        max_iter=max_iter,
        bounds=(lo, hi),
    )


def _check_inside(x: jax.Array, bounds: tuple[float, float], fn: str) -> None:
    if _checks.is_concrete(x):  # numpy: a jnp reduction of a closed-over x is traced under jit
        values = np.asarray(x)
        lo, hi = float(np.min(values)), float(np.max(values))
        if lo < bounds[0] or hi > bounds[1]:
            raise ValueError(
                f"{fn}: the image's values [{lo:.4g}, {hi:.4g}] leave bounds {bounds}; scale "
                "the image into the box or pass the bounds its values live in."
            )


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _sparsefool_core(apply_fn, x, settings):
    return engine.loop(sparsefool_iterative(apply_fn), settings, x)


def sparsefool(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    *,
    lambda_: float = 3.0,
    max_iter: int = 20,
    epsilon: float = 0.02,
    bounds: tuple[float, float] = (0.0, 1.0),
    delta: float | None = None,
    candidates: int = 10,
    overshoot: float = 0.02,
    deepfool_max_iter: int = 50,
) -> SparseResult:
    """A sparse perturbation that changes the label of ONE image (SparseFool).

    See the module docstring for the algorithm. A pure function of one image:
    composes with ``jax.jit`` and ``jax.vmap``; ``bgeom.batched(bgeom.sparsefool)``
    runs a batch with compaction.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters (any pytree); traced.
      x: one image (H, W, C) inside ``bounds``.
      lambda_: how far past the boundary point the hyperplane is anchored
        (``x_B = x_i + lambda_ (z - x_i)``; the reference's 3).
      max_iter: most outer iterations (the reference code's 20).
      epsilon: the final overshoot ``x_adv = x_0 + (1 + epsilon)(x_i - x_0)``.
      bounds: the valid pixel range ``(low, high)``.
      delta: the largest change of one pixel value (perceptibility), inside
        ``bounds``; ``None``: the whole range.
      candidates, overshoot, deepfool_max_iter: the DeepFool search of every
        boundary point.

    Returns:
      ``SparseResult``; ``status`` says why a search did not flip the label.

    References:
      Method page: docs/sparsefool.md.
      Modas, Moosavi-Dezfooli, Frossard. "SparseFool: a few pixels make a big
      difference", CVPR 2019. https://arxiv.org/abs/1811.02248
    """
    fn = "sparsefool"
    x, settings = _settings(
        fn,
        apply_fn,
        params,
        x,
        lambda_=lambda_,
        max_iter=max_iter,
        epsilon=epsilon,
        bounds=bounds,
        delta=delta,
        candidates=candidates,
        overshoot=overshoot,
        deepfool_max_iter=deepfool_max_iter,
    )
    _check_inside(x, settings.bounds, fn)
    return _sparsefool_core(apply_fn, x, settings)


@engine.register(sparsefool)
def _sparsefool_plan(apply_fn, params, xs, **options):
    import inspect

    fn = "bgeom.batched(sparsefool)"
    defaults = {
        k: p.default
        for k, p in inspect.signature(sparsefool).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{fn}: unknown option(s) {unknown}; valid: {sorted(defaults)}.")
    boundary.check_batch(xs, fn)
    _, settings = _settings(fn, apply_fn, params, xs[0], **{**defaults, **options})
    _check_inside(xs, settings.bounds, fn)
    return sparsefool_iterative(apply_fn), settings, (xs,)
