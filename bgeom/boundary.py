"""Boundary primitives shared by every analysis: the linearised DeepFool step and boundary points.

One classifier ``f`` (logits of ONE example), two classes ``i, j``, and the
boundary ``F_ij = f_i - f_j = 0``. Everything in bgeom that walks to a
boundary does it with the same linearised step: at ``z``, with
``g = f_k(z) - f_ref(z)`` and ``w = grad g(z)`` (projected onto a subspace S
when one is given), the nearest point of the linearised boundary is
``|g| / ||w||`` away along ``w / ||w||``, and the step goes there plus a fixed
``1e-4`` so the iteration never stalls exactly on it. Two searches repeat it:

- ``deepfool_search``: untargeted, ``ref`` the clean label and ``k`` the
  closest of the top ``candidates`` classes at every step (DeepFool, and its
  subspace-restricted version of "Hold me tight!");
- ``targeted_search``: ``k`` a chosen class, ``ref`` its strongest rival at the
  current point (targeted DeepFool; the anchors of connectivity paths).

``boundary_point`` (public) runs one of them and moves its end point back onto
``F = 0`` along the segment from ``x`` (Illinois false position), with the
unit normal there. ``DeepFoolOptions`` is the one options type of this family:
``candidates``, ``overshoot``, ``max_iter`` and ``bounds``, with their defaults.

The searches are pure, fixed-shape ``lax.while_loop`` programs: they compose
with ``jax.jit`` and ``jax.vmap`` (over examples, targets and parameters).
See docs/boundary.md.

References:
  Moosavi-Dezfooli, Fawzi, Frossard. "DeepFool: a simple and accurate method
  to fool deep neural networks", CVPR 2016. https://arxiv.org/abs/1511.04599
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bgeom import _checks, engine

# DeepFool's fixed extra step length ("+ 1e-4" in the reference code): it pushes
# each linearised step slightly past the hyperplane so the iteration cannot stall
# exactly on it.
STEP_EPS = 1e-4
# Illinois false-position steps that move a search's end point onto F = 0.
REFINE_STEPS = 30

# ``BoundaryPoint.status`` codes (index into STATUS_NAMES).
CONVERGED = 0  # the label flipped and the point was refined onto F = 0
NOT_FLIPPED = 1  # the search ended (max_iter) without reaching the adverse class
NO_BRACKET = 2  # F does not change sign along the segment: nothing to refine
NONFINITE = 3  # NaN/Inf logits or gradients, or a zero normal at the refined point
ZERO_GRADIENT = 4  # every (projected) gradient difference vanished: no linearised step exists
STATUS_NAMES = ("converged", "not_flipped", "no_bracket", "nonfinite", "zero_gradient")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["overshoot"],
    meta_fields=["candidates", "max_iter", "bounds"],
)
@dataclasses.dataclass(frozen=True)
class DeepFoolOptions:
    """Settings of every DeepFool-style search, with their defaults.

    A pytree: ``overshoot`` is data (traced under jit, so changing it does not
    recompile), the rest set shapes and loop bounds and are static.

    Attributes:
      candidates: the top classes of the clean logits considered by untargeted
        DeepFool (capped at the number of classes; at least 2). Unused by
        targeted searches.
      overshoot: the search stops when ``x + (1 + overshoot) r`` is in the
        adverse class and returns that perturbation.
      max_iter: most linearisation steps (0: no step).
      bounds: ``(low, high)`` box the perturbed point is clipped to at every
        step, or ``None`` (never clip).
    """

    candidates: int = 10
    overshoot: float = 0.02
    max_iter: int = 50
    bounds: tuple[float, float] | None = None

    def checked(
        self, fn_name: str, apply_fn: Callable, params: Any, x: Any
    ) -> tuple[jax.Array, DeepFoolOptions]:
        """Validate these options and ``apply_fn(params, x)`` for ``fn_name``.

        Returns ``x`` as an array and the options ready for a search: candidates
        capped at the number of classes, bounds as floats, overshoot an array of
        ``x``'s dtype. Raises ``ValueError`` with what to do.
        """
        if not callable(apply_fn):
            raise ValueError(f"{fn_name}: apply_fn must be callable as apply_fn(params, x).")
        x = _checks.check_example(x, fn_name)
        num_classes = _checks.check_logits(apply_fn, params, x, fn_name)
        candidates = _checks.check_positive_int(self.candidates, "candidates", fn_name, minimum=2)
        max_iter = _checks.check_positive_int(self.max_iter, "max_iter", fn_name, minimum=0)
        overshoot = _checks.check_nonnegative_float(self.overshoot, "overshoot", fn_name)
        bounds = self.bounds
        if bounds is not None:
            try:
                lo, hi = (float(b) for b in bounds)
            except (TypeError, ValueError):
                raise ValueError(f"{fn_name}: bounds must be a pair (low, high) or None.") from None
            if not lo < hi:
                raise ValueError(f"{fn_name}: bounds must satisfy low < high; got {bounds}.")
            bounds = (lo, hi)
        return x, DeepFoolOptions(
            candidates=min(candidates, num_classes),
            overshoot=jnp.asarray(overshoot, x.dtype),
            max_iter=max_iter,
            bounds=bounds,
        )


def options_or_default(options: Any, argument: str) -> DeepFoolOptions:
    """``options`` if it is a ``DeepFoolOptions``, the defaults for ``None``; else raise."""
    if options is None:
        return DeepFoolOptions()
    if not isinstance(options, DeepFoolOptions):
        raise ValueError(
            f"{argument} must be a bgeom.DeepFoolOptions (or None for the defaults); got "
            f"{type(options).__name__}, e.g. {argument}=bgeom.DeepFoolOptions(max_iter=100)."
        )
    return options


def check_class_index(value: Any, name: str, num_classes: int, fn_name: str) -> jax.Array:
    """Check a class index (a Python int or an integer scalar array, maybe traced)."""
    if isinstance(value, bool):
        raise ValueError(f"{fn_name}: {name} must be an integer class index; got {value!r}.")
    arr = jnp.asarray(value)
    if arr.ndim != 0 or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(
            f"{fn_name}: {name} must be ONE integer class index; got {value!r} "
            f"(shape {tuple(arr.shape)}, dtype {arr.dtype}). Map over several with jax.vmap."
        )
    if _checks.is_concrete(arr) and not 0 <= int(arr) < num_classes:
        raise ValueError(
            f"{fn_name}: {name} must be a class index in [0, {num_classes}); got {int(arr)}."
        )
    return arr.astype(jnp.int32)


# ------------------------------------------------------------ the linearised step


def flat_norm(w: jax.Array) -> jax.Array:
    """L2 norm of each row of a stack, over every axis but the first."""
    return jnp.sqrt(jnp.sum(jnp.square(w.reshape(w.shape[0], -1)), axis=1))


class Linearisation(NamedTuple):
    """Class differences and their gradients at one point.

    Attributes:
      logits: ``f(z)``.
      g: ``c @ f(z)`` for every cotangent row ``c`` (``f_k - f_ref``).
      w: the matching gradients ``grad (c @ f)(z)``, projected onto a subspace
        when a projection is given; shape ``(K,) + z.shape`` (or ``z.shape`` for
        one cotangent vector).
    """

    logits: jax.Array
    g: jax.Array
    w: jax.Array


def linearise(
    f: Callable, z: jax.Array, cotangents: jax.Array, project: Callable | None = None
) -> Linearisation:
    """Linearise the class differences picked by ``cotangents`` at ``z``.

    ``cotangents`` is one vector ``(L,)`` or a stack ``(K, L)`` of them (all
    gradients then come from ONE batched VJP). ``project(w)`` maps one
    gradient to its projection onto a subspace (``None``: the identity).
    """
    logits, vjp = jax.vjp(f, z)
    if cotangents.ndim == 1:
        (w,) = vjp(cotangents)
        if project is not None:
            w = project(w)
    else:
        (w,) = jax.vmap(vjp)(cotangents)
        if project is not None:
            w = jax.vmap(project)(w)
    return Linearisation(logits, cotangents @ logits, w)


def step_to_hyperplane(g: jax.Array, w: jax.Array, w_norm: jax.Array) -> jax.Array:
    """The linearised DeepFool step onto ``g + <w, dz> = 0``: ``(|g| / ||w|| + 1e-4) w / ||w||``."""
    return (jnp.abs(g) / w_norm + STEP_EPS) * w / w_norm


def _overshot_point(x: jax.Array, r: jax.Array, options: DeepFoolOptions) -> jax.Array:
    """``x + (1 + overshoot) r``, clipped to ``bounds`` when given."""
    z = x + (1.0 + options.overshoot) * r
    return z if options.bounds is None else jnp.clip(z, options.bounds[0], options.bounds[1])


class Search(NamedTuple):
    """The end of a DeepFool-style search from ``x``.

    Attributes:
      perturbation: ``clip(x + (1 + overshoot) r) - x``.
      label: the model's prediction at ``x``.
      adv_label: the prediction at ``x + perturbation``.
      iterations: linearisation steps taken.
      reached: the search reached what it looked for (untargeted: a label other
        than ``label``; targeted: the target).
      finite: every quantity along the way was finite.
      stalled: the search stopped at a zero (projected) gradient difference:
        to first order no step changes the logits it follows.
    """

    perturbation: jax.Array
    label: jax.Array
    adv_label: jax.Array
    iterations: jax.Array
    reached: jax.Array
    finite: jax.Array
    stalled: jax.Array


class Shared(NamedTuple):
    """What every example of a DeepFool-style search shares (traced)."""

    params: Any
    options: DeepFoolOptions


class DeepFoolState(NamedTuple):
    """The state of one untargeted DeepFool search (see ``deepfool_iterative``)."""

    x: jax.Array
    subspace: Any  # the subspace every gradient difference is projected onto, or None
    k0: jax.Array  # the clean label
    cotangents: jax.Array  # (candidates - 1, L) rows picking f_k - f_k0
    clean_finite: jax.Array
    iterations: jax.Array
    r: jax.Array
    label: jax.Array  # the label at the overshot point
    ok: jax.Array  # the last linearisation was finite and non-degenerate
    stalled: jax.Array  # it was finite with every gradient difference zero


@functools.lru_cache(maxsize=128)
def deepfool_iterative(apply_fn: Callable, projected: bool = False) -> engine.Iterative:
    """Untargeted DeepFool as an ``engine.Iterative``; example ``(x,)`` or ``(x, subspace)``.

    Candidates are the top ``options.candidates`` classes of the clean logits.
    At ``z = x + (1 + overshoot) r`` (the reference code and foolbox linearise
    at the overshot point, the point whose label decides when to stop) the step
    goes to the nearest linearised boundary ``l = argmin_k |g_k| / ||w_k||``,
    every gradient difference projected onto the example's subspace when
    ``projected``. It stops when the label at ``z`` changes, after
    ``max_iter`` steps, or at a degenerate linearisation. ``finish`` gives a
    ``Search``. Expects ``Shared(params, options)`` with options from
    ``DeepFoolOptions.checked``.
    """

    def init(c: Shared, x: jax.Array, subspace: Any = None) -> DeepFoolState:
        logits0 = apply_fn(c.params, x)
        _, order = jax.lax.top_k(logits0, c.options.candidates)  # best first
        onehots = jax.nn.one_hot(order, logits0.shape[0], dtype=logits0.dtype)
        return DeepFoolState(
            x=x,
            subspace=subspace if projected else None,
            k0=order[0],
            cotangents=onehots[1:] - onehots[0],
            clean_finite=jnp.all(jnp.isfinite(logits0)),
            iterations=jnp.asarray(0, jnp.int32),
            r=jnp.zeros_like(x),
            label=order[0],
            ok=jnp.asarray(True),
            stalled=jnp.asarray(False),
        )

    def step(c: Shared, s: DeepFoolState) -> DeepFoolState:
        if not projected:
            return deepfool_advance(apply_fn, c, s, linearise_state(apply_fn, c, s))
        coordinates = lambda w: s.subspace.coordinates(s.subspace.analyse(w))
        lin = linearise_state(apply_fn, c, s, coordinates)
        return deepfool_advance(apply_fn, c, s, lin, s.subspace.synthesise)

    def running(c: Shared, s: DeepFoolState) -> jax.Array:
        return (s.iterations < c.options.max_iter) & (s.label == s.k0) & s.ok

    def finish(c: Shared, s: DeepFoolState) -> Search:
        perturbation = _overshot_point(s.x, s.r, c.options) - s.x
        finite = (s.ok | s.stalled) & jnp.isfinite(jnp.linalg.norm(perturbation.ravel()))
        return Search(
            perturbation=perturbation,
            label=s.k0.astype(jnp.int32),
            adv_label=s.label.astype(jnp.int32),
            iterations=s.iterations,
            reached=s.label != s.k0,
            finite=finite & s.clean_finite,
            stalled=s.stalled,
        )

    return engine.Iterative(init, step, running, finish)


def linearise_state(
    apply_fn: Callable, c: Shared, s: DeepFoolState, project: Callable | None = None
) -> Linearisation:
    """The candidates' class differences and gradients at the state's overshot point."""
    f = lambda z: apply_fn(c.params, z)
    return linearise(f, _overshot_point(s.x, s.r, c.options), s.cotangents, project)


def deepfool_advance(
    apply_fn: Callable,
    c: Shared,
    s: DeepFoolState,
    lin: Linearisation,
    synthesise: Callable | None = None,
) -> DeepFoolState:
    """One DeepFool step from state ``s`` given its linearisation ``lin``.

    With a subspace, ``lin.w`` holds the gradients' coordinates in it (their
    norms are the projections' norms) and ``synthesise`` maps the chosen
    step's coordinates back to an image: one inverse transform per step rather
    than one per candidate.
    """
    f = lambda z: apply_fn(c.params, z)
    w_norm = flat_norm(lin.w)
    pert = jnp.where(w_norm > 0, jnp.abs(lin.g) / jnp.where(w_norm > 0, w_norm, 1.0), jnp.inf)
    best = jnp.argmin(pert)
    finite = jnp.all(jnp.isfinite(lin.logits)) & jnp.all(jnp.isfinite(lin.w))
    ok = jnp.isfinite(pert[best]) & jnp.all(jnp.isfinite(lin.logits))
    dr = step_to_hyperplane(lin.g[best], lin.w[best], jnp.where(ok, w_norm[best], 1.0))
    if synthesise is not None:
        dr = synthesise(dr)
    r = jnp.where(ok, s.r + dr, s.r)
    label = jnp.argmax(f(_overshot_point(s.x, r, c.options)))
    return s._replace(
        iterations=s.iterations + 1,
        r=r,
        label=label,
        ok=ok,
        stalled=finite & jnp.all(w_norm == 0),
    )


def deepfool_search(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    options: DeepFoolOptions,
    subspace: Any = None,
) -> Search:
    """Untargeted DeepFool from ``x`` (``deepfool_iterative`` as one while loop).

    With a ``subspace``, every gradient difference is projected onto it.
    Traceable; expects options from ``DeepFoolOptions.checked``.
    """
    it = deepfool_iterative(apply_fn, subspace is not None)
    example = (x,) if subspace is None else (x, subspace)
    return engine.loop(it, Shared(params, options), *example)


class _TargetedState(NamedTuple):
    x: jax.Array
    target: jax.Array
    iterations: jax.Array
    r: jax.Array
    reached: jax.Array  # the label at the overshot point is the target
    ok: jax.Array
    stalled: jax.Array  # a finite linearisation with a zero gradient difference


@functools.lru_cache(maxsize=128)
def targeted_iterative(apply_fn: Callable) -> engine.Iterative:
    """Targeted DeepFool as an ``engine.Iterative``; example ``(x, target)``.

    At ``z = x + (1 + overshoot) r`` let ``c`` be the strongest class other than
    the target; the step goes onto the linearised boundary of
    ``F = f_target - f_c``. One forward pass per step both tests the label of
    ``z`` and linearises there. It stops when ``z`` is in the target class,
    after ``max_iter`` steps, or at a degenerate linearisation. Following the
    current rival (not only the clean label) keeps the iteration going when it
    passes through a third class. ``finish`` gives a ``Search``.
    """

    def one_hot(c: Shared, s: _TargetedState, k: jax.Array) -> jax.Array:
        num_classes = jax.eval_shape(apply_fn, c.params, s.x).shape[0]
        return jax.nn.one_hot(k, num_classes, dtype=s.x.dtype)

    def init(c: Shared, x: jax.Array, target: jax.Array) -> _TargetedState:
        false = jnp.asarray(False)
        zero = jnp.asarray(0, jnp.int32)
        return _TargetedState(x, target, zero, jnp.zeros_like(x), false, jnp.asarray(True), false)

    def step(c: Shared, s: _TargetedState) -> _TargetedState:
        f = lambda z: apply_fn(c.params, z)
        is_target = one_hot(c, s, s.target)
        logits, vjp = jax.vjp(f, _overshot_point(s.x, s.r, c.options))
        reached = jnp.argmax(logits) == s.target
        rival = jnp.argmax(jnp.where(is_target > 0, -jnp.inf, logits))
        cotangent = is_target - one_hot(c, s, rival).astype(logits.dtype)
        (w,) = vjp(cotangent)
        g = cotangent @ logits
        w_norm = jnp.linalg.norm(w.ravel())
        finite = jnp.isfinite(w_norm) & jnp.isfinite(g) & jnp.all(jnp.isfinite(logits))
        ok = (w_norm > 0) & finite
        move = ok & ~reached
        r = jnp.where(move, s.r + step_to_hyperplane(g, w, jnp.where(ok, w_norm, 1.0)), s.r)
        return s._replace(
            iterations=s.iterations + move.astype(jnp.int32),
            r=r,
            reached=reached,
            ok=ok | reached,
            stalled=finite & (w_norm == 0) & ~reached,
        )

    def running(c: Shared, s: _TargetedState) -> jax.Array:
        return (s.iterations < c.options.max_iter) & ~s.reached & s.ok

    def finish(c: Shared, s: _TargetedState) -> Search:
        # Clean and final logits in one batched call (the final point is tested
        # once more so that a run stopped by max_iter reports its true label).
        point = _overshot_point(s.x, s.r, c.options)
        logits0, logits_end = jax.vmap(lambda z: apply_fn(c.params, z))(jnp.stack([s.x, point]))
        adv_label = jnp.argmax(logits_end)
        perturbation = point - s.x
        finite = jnp.all(jnp.isfinite(logits0)) & jnp.all(jnp.isfinite(logits_end))
        finite = finite & (s.ok | s.stalled) & jnp.isfinite(jnp.linalg.norm(perturbation.ravel()))
        return Search(
            perturbation=perturbation,
            label=jnp.argmax(logits0).astype(jnp.int32),
            adv_label=adv_label.astype(jnp.int32),
            iterations=s.iterations,
            reached=adv_label == s.target,
            finite=finite,
            stalled=s.stalled,
        )

    return engine.Iterative(init, step, running, finish)


def targeted_search(
    apply_fn: Callable, params: Any, x: jax.Array, target: jax.Array, options: DeepFoolOptions
) -> Search:
    """Targeted DeepFool from ``x`` into class ``target`` (``targeted_iterative`` as one loop).

    Traceable; expects options from ``DeepFoolOptions.checked``.
    """
    return engine.loop(targeted_iterative(apply_fn), Shared(params, options), x, target)


# ------------------------------------------------------------ boundary points


def pair_function(apply_fn: Callable, params: Any, label: jax.Array, adv_label: jax.Array):
    """``F(z) = f_label(z) - f_adv_label(z)``: positive in ``label``'s region."""

    def F(z):
        logits = apply_fn(params, z)
        return logits[label] - logits[adv_label]

    return F


class _Bracket(NamedTuple):
    iterations: jax.Array
    a: jax.Array  # F(x + a p) > 0
    fa: jax.Array  # (Illinois-scaled) value at a
    b: jax.Array  # F(x + b p) < 0
    fb: jax.Array
    side: jax.Array  # -1: b was kept last, +1: a was kept last
    t: jax.Array  # the latest iterate
    ft: jax.Array  # its value


def refine_onto_boundary(F: Callable, x: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move along the segment ``x + t p`` onto ``F = 0`` (Illinois false position).

    ``F(x) > 0`` and ``F(x + p) < 0`` bracket the root; false position with the
    Illinois modification converges superlinearly and keeps the bracket, so a
    fixed budget of ``REFINE_STEPS`` forward passes suffices. Returns the point
    and whether the bracket was valid.
    """
    phi = lambda t: F(x + t * p)
    zero, one = jnp.asarray(0.0, x.dtype), jnp.asarray(1.0, x.dtype)
    f0, f1 = phi(zero), phi(one)
    ok = (f0 > 0) & (f1 < 0)
    tol = 1e-6 * (jnp.abs(f0) + jnp.abs(f1))

    def running(s: _Bracket) -> jax.Array:
        return ok & (s.iterations < REFINE_STEPS) & (jnp.abs(s.ft) > tol) & (s.b - s.a > 1e-7)

    def step(s: _Bracket) -> _Bracket:
        t = jnp.clip((s.a * s.fb - s.b * s.fa) / (s.fb - s.fa), s.a, s.b)
        ft = phi(t)
        left = ft > 0  # the root lies in [t, b]: t replaces a
        # Illinois: halve the end value kept twice in a row so both ends move.
        fa_kept = jnp.where(s.side == 1, s.fa / 2, s.fa)
        fb_kept = jnp.where(s.side == -1, s.fb / 2, s.fb)
        return _Bracket(
            iterations=s.iterations + 1,
            a=jnp.where(left, t, s.a),
            fa=jnp.where(left, ft, fa_kept),
            b=jnp.where(left, s.b, t),
            fb=jnp.where(left, fb_kept, ft),
            side=jnp.where(left, -1, 1),
            t=t,
            ft=ft,
        )

    init = _Bracket(
        jnp.asarray(0, jnp.int32), zero, f0, one, f1, jnp.asarray(0, jnp.int32), one, f1
    )
    t = jax.lax.while_loop(running, step, init).t
    return x + t * p, ok


class BoundaryPoint(NamedTuple):
    """A point on the decision boundary near one example, with its normal.

    Attributes:
      point: the search's end point moved back onto ``F = f_adv - f_label = 0``
        along the segment from ``x``.
      normal: ``grad F(point) / ||grad F(point)||``, pointing into ``adv_label``.
      label: the model's prediction at ``x``.
      adv_label: the class on the other side (the target when one was given).
      distance: ``||point - x||``.
      converged: the search reached the adverse class, ``F`` changed sign along
        the segment and every number is finite (``status == 0``).
      status: why it did or did not converge, an index into ``STATUS_NAMES``.
    """

    point: jax.Array
    normal: jax.Array
    label: jax.Array
    adv_label: jax.Array
    distance: jax.Array
    converged: jax.Array
    status: jax.Array


def boundary_status(search: Search, bracket: jax.Array, normal_ok: Any = True) -> jax.Array:
    """The ``STATUS_NAMES`` code of a search refined with a (valid or not) bracket.

    In order: a non-finite search, no flip (a zero gradient difference that
    stopped the search, else the budget; also a targeted search whose target is
    the clean label), no sign change of ``F`` along the segment, and a
    non-finite or zero normal at the refined point.
    """
    flipped = search.reached & (search.adv_label != search.label)
    status = jnp.where(normal_ok, CONVERGED, NONFINITE)
    status = jnp.where(bracket, status, NO_BRACKET)
    status = jnp.where(flipped, status, jnp.where(search.stalled, ZERO_GRADIENT, NOT_FLIPPED))
    return jnp.where(search.finite, status, NONFINITE).astype(jnp.int32)


def find_boundary_point(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    options: DeepFoolOptions,
    target: jax.Array | None = None,
) -> tuple[Search, jax.Array, jax.Array]:
    """The search (untargeted, or into ``target``) and its end point refined onto the boundary.

    Traceable core of ``boundary_point`` for analyses that need the point but
    not the normal. Returns ``(search, point, bracket_ok)``.
    """
    if target is None:
        search = deepfool_search(apply_fn, params, x, options)
    else:
        search = targeted_search(apply_fn, params, x, target, options)
    F = pair_function(apply_fn, params, search.label, search.adv_label)
    point, bracket = refine_onto_boundary(F, x, search.perturbation)
    return search, point, bracket


def _refined(apply_fn: Callable, params: Any, x: jax.Array, search: Search) -> BoundaryPoint:
    """A finished search's end point moved onto the boundary, with the normal there."""
    F = pair_function(apply_fn, params, search.label, search.adv_label)
    point, bracket = refine_onto_boundary(F, x, search.perturbation)
    grad = jax.grad(pair_function(apply_fn, params, search.adv_label, search.label))(point)
    grad_norm = jnp.linalg.norm(grad.ravel())
    finite = jnp.isfinite(grad_norm) & (grad_norm > 0)
    status = boundary_status(search, bracket, finite)
    return BoundaryPoint(
        point=point,
        normal=grad / jnp.where(finite, grad_norm, 1.0),
        label=search.label,
        adv_label=search.adv_label,
        distance=jnp.linalg.norm((point - x).ravel()),
        converged=status == CONVERGED,
        status=status,
    )


@functools.lru_cache(maxsize=128)
def boundary_point_iterative(apply_fn: Callable, targeted: bool) -> engine.Iterative:
    """``boundary_point`` as an ``engine.Iterative``; example ``(x,)`` or ``(x, target)``."""
    base = targeted_iterative(apply_fn) if targeted else deepfool_iterative(apply_fn)

    def finish(c: Shared, s: Any) -> BoundaryPoint:
        return _refined(apply_fn, c.params, s.x, base.finish(c, s))

    return base._replace(finish=finish)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _boundary_point_core(apply_fn, params, x, target, options):
    example = (x,) if target is None else (x, target)
    it = boundary_point_iterative(apply_fn, target is not None)
    return engine.loop(it, Shared(params, options), *example)


def boundary_point(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    *,
    target: int | jax.Array | None = None,
    candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 50,
    bounds: tuple[float, float] | None = None,
) -> BoundaryPoint:
    """The point of the decision boundary DeepFool finds near ONE example, and its normal.

    DeepFool (or, with ``target``, targeted DeepFool into that class) gives a
    perturbation ``p`` from ``x`` into the adverse class; the point is moved
    back along the segment ``x + t p`` onto ``F = f_adv - f_label = 0`` by
    Illinois false position (at most 30 forward passes), so it lies on the
    boundary to float precision rather than ``overshoot`` past it. The normal
    is ``grad F / ||grad F||`` there, pointing into the adverse class.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters (any pytree); traced.
      x: one example of shape (H, W, C).
      target: the adverse class (an integer, may be traced); ``None`` (default):
        the class untargeted DeepFool reaches.
      candidates, overshoot, max_iter, bounds: the search's settings
        (``DeepFoolOptions``).

    Returns:
      ``BoundaryPoint``; ``status`` (``STATUS_NAMES``) says why a point is not
      ``converged``: the search did not flip the label, ``F`` did not change
      sign along the segment, or a number was not finite. Never an exception
      under jit.

    References:
      Moosavi-Dezfooli et al., CVPR 2016, https://arxiv.org/abs/1511.04599 ;
      docs/boundary.md.
    """
    options = DeepFoolOptions(candidates, overshoot, max_iter, bounds)
    x, options = options.checked("boundary_point", apply_fn, params, x)
    if target is not None:
        num_classes = _checks.check_logits(apply_fn, params, x, "boundary_point")
        target = check_class_index(target, "target", num_classes, "boundary_point")
        if _checks.is_concrete(target) and all(
            _checks.is_concrete(a) for a in jax.tree.leaves((params, x))
        ):
            label = int(jnp.argmax(apply_fn(params, x)))
            if int(target) == label:
                raise ValueError(
                    f"boundary_point: target {label} is the model's own label at x; a "
                    "boundary point needs another class (or target=None for the nearest)."
                )
    return _boundary_point_core(apply_fn, params, x, target, options)


def options_of(fn: Callable, fn_name: str, options: dict[str, Any]) -> DeepFoolOptions:
    """The ``DeepFoolOptions`` a call ``fn(..., **options)`` would use (``fn``'s defaults).

    For the batched forms of the DeepFool family: unknown keywords raise
    ``ValueError`` listing the valid ones.
    """
    import inspect

    names = ("candidates", "overshoot", "max_iter", "bounds")
    params = inspect.signature(fn).parameters
    valid = [n for n in names if n in params]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"{fn_name}: unknown option(s) {unknown}; valid: {valid} (and batch_size, "
            "progress, desc, return_stats for the batched driver)."
        )
    values = {n: options.get(n, params[n].default) for n in valid}
    return DeepFoolOptions(**{"candidates": 2, **values})


def check_batch(xs: jax.Array, fn_name: str) -> None:
    """A batch's rank and, when its values are known, their finiteness."""
    if _checks.is_concrete(xs) and not bool(np.all(np.isfinite(np.asarray(xs)))):
        raise ValueError(f"{fn_name} got inputs with NaN or Inf values; clean them first.")


@engine.register(boundary_point)
def _boundary_point_plan(apply_fn, params, xs, *, target=None, **options):
    fn = "bgeom.batched(boundary_point)"
    check_batch(xs, fn)
    _, opts = options_of(boundary_point, fn, options).checked(fn, apply_fn, params, xs[0])
    if target is None:
        return boundary_point_iterative(apply_fn, False), Shared(params, opts), (xs,)
    target = jnp.asarray(target, jnp.int32)
    if target.shape != xs.shape[:1]:
        raise ValueError(
            f"{fn}: target must give one class per image, shape ({xs.shape[0]},); got "
            f"{tuple(target.shape)}."
        )
    return boundary_point_iterative(apply_fn, True), Shared(params, opts), (xs, target)
