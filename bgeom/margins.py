"""Margins: the minimal L2 perturbation that changes a classifier's label.

``deepfool`` is the multi-class L2 DeepFool of Moosavi-Dezfooli et al.;
``subspace_deepfool`` is the same iteration restricted to a subspace (the margins
along subspaces of "Hold me tight!"), and ``subspace_margins`` computes them for
N samples x M subspaces in one jitted call. See SPEC.md section 1. Every
function works on ONE example (``subspace_margins`` is their vmap) and composes
with ``jax.jit`` and ``jax.vmap``; no Python loop runs over samples or classes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bgeom import _checks
from bgeom import subspaces as subspaces_lib

# DeepFool's fixed extra step length ("+ 1e-4" in the reference code): it pushes
# each linearised step slightly past the hyperplane so the iteration cannot stall
# exactly on it.
_STEP_EPS = 1e-4


class MarginResult(NamedTuple):
    """Outcome of a margin computation for one example.

    Attributes:
      perturbation: the returned perturbation ``(1 + overshoot) r``, shape of ``x``.
      margin: its L2 norm when ``converged``; ``inf`` when the label did not flip,
        so a failed search is never mistaken for a margin.
      label: the model's own prediction at ``x`` (not the ground truth).
      adv_label: the prediction at ``x + perturbation``.
      iterations: number of linearisation steps taken.
      converged: True iff ``adv_label != label`` and every quantity is finite.
    """

    perturbation: jax.Array
    margin: jax.Array
    label: jax.Array
    adv_label: jax.Array
    iterations: jax.Array
    converged: jax.Array


def _flat_norm(w: jax.Array) -> jax.Array:
    """L2 norm of each row of a stack, over every axis but the first."""
    return jnp.sqrt(jnp.sum(jnp.square(w.reshape(w.shape[0], -1)), axis=1))


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "project", "candidates", "max_iter", "bounds")
)
def _deepfool_core(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    overshoot: jax.Array,
    subspace: Any,
    *,
    project: Callable | None,
    candidates: int,
    max_iter: int,
    bounds: tuple[float, float] | None,
) -> MarginResult:
    """DeepFool iteration with every gradient difference passed through ``project``.

    ``project(subspace, w)`` maps one gradient difference (shape of ``x``) to its
    orthogonal projection onto a subspace; ``None`` is the identity (plain
    DeepFool). This is the one implementation behind ``deepfool`` and the
    subspace margins of "Hold me tight!".
    """
    f = lambda z: apply_fn(params, z)
    logits0 = f(x)
    num_classes = logits0.shape[0]
    _, order = jax.lax.top_k(logits0, candidates)  # candidates, best first
    k0 = order[0]
    onehots = jax.nn.one_hot(order, num_classes, dtype=logits0.dtype)
    cotangents = onehots[1:] - onehots[0]  # rows pick f_k - f_k0
    scale = 1.0 + overshoot

    def point(r):
        z = x + scale * r
        return z if bounds is None else jnp.clip(z, bounds[0], bounds[1])

    def body(state):
        i, r, _, _ = state
        # The reference code (and foolbox) linearise at the overshot point, the
        # same point whose label decides when to stop.
        logits, vjp = jax.vjp(f, point(r))
        (w,) = jax.vmap(vjp)(cotangents)  # all candidate gradients, one batched VJP
        if project is not None:
            w = jax.vmap(lambda wk: project(subspace, wk))(w)
        g = cotangents @ logits
        w_norm = _flat_norm(w)
        pert = jnp.where(w_norm > 0, jnp.abs(g) / jnp.where(w_norm > 0, w_norm, 1.0), jnp.inf)
        best = jnp.argmin(pert)
        ok = jnp.isfinite(pert[best]) & jnp.all(jnp.isfinite(logits))
        step = (pert[best] + _STEP_EPS) * w[best] / jnp.where(ok, w_norm[best], 1.0)
        r = jnp.where(ok, r + step, r)
        label = jnp.argmax(f(point(r)))
        return i + 1, r, label, ok

    def cond(state):
        i, _, label, ok = state
        return (i < max_iter) & (label == k0) & ok

    init = (jnp.asarray(0, jnp.int32), jnp.zeros_like(x), k0, jnp.asarray(True))
    iterations, r, adv_label, ok = jax.lax.while_loop(cond, body, init)
    perturbation = point(r) - x
    norm = jnp.linalg.norm(perturbation.ravel())
    converged = (adv_label != k0) & ok & jnp.isfinite(norm) & jnp.all(jnp.isfinite(logits0))
    return MarginResult(
        perturbation=perturbation,
        margin=jnp.where(converged, norm, jnp.inf),
        label=k0.astype(jnp.int32),
        adv_label=adv_label.astype(jnp.int32),
        iterations=iterations,
        converged=converged,
    )


def _check_margin_args(
    fn_name: str,
    apply_fn: Callable,
    params: Any,
    x: Any,
    candidates: int,
    overshoot: float,
    max_iter: int,
    bounds: Any,
) -> tuple[jax.Array, int, tuple[float, float] | None]:
    """Validate the arguments common to every DeepFool-style margin."""
    if not callable(apply_fn):
        raise ValueError(f"{fn_name}: apply_fn must be callable as apply_fn(params, x).")
    x = _checks.check_example(x, fn_name)
    num_classes = _checks.check_logits(apply_fn, params, x, fn_name)
    candidates = _checks.check_positive_int(candidates, "candidates", fn_name, minimum=2)
    _checks.check_positive_int(max_iter, "max_iter", fn_name, minimum=0)
    _checks.check_nonnegative_float(overshoot, "overshoot", fn_name)
    if bounds is not None:
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise ValueError(f"{fn_name}: bounds must be a pair (low, high) or None.") from None
        if not lo < hi:
            raise ValueError(f"{fn_name}: bounds must satisfy low < high; got {bounds}.")
        bounds = (lo, hi)
    return x, min(candidates, num_classes), bounds


def deepfool(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    *,
    candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 50,
    bounds: tuple[float, float] | None = None,
) -> MarginResult:
    """Minimal L2 perturbation that flips the label of ONE example (DeepFool).

    Candidates are the top ``candidates`` classes of the clean logits. From
    ``r = 0``, at ``z = x + (1 + overshoot) r``, for every candidate ``k != k0``:
    ``w_k = grad f_k(z) - grad f_k0(z)``, ``g_k = f_k(z) - f_k0(z)``; the step goes
    to the nearest linearised boundary ``l = argmin |g_k| / ||w_k||``:
    ``r += (|g_l| / ||w_l|| + 1e-4) w_l / ||w_l||``. It stops as soon as
    ``k(x + (1 + overshoot) r) != k0`` or after ``max_iter`` steps and returns
    ``(1 + overshoot) r``. All candidate gradients come from one batched VJP.

    Like the reference implementation and foolbox, the linearisation point is
    the overshot point ``x + (1 + overshoot) r`` (whose label is tested anyway);
    on an affine classifier this is the exact one-step answer of SPEC.md.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters (any pytree); traced.
      x: one example of shape (H, W, C).
      candidates: number of top classes considered (capped at the number of
        classes; at least 2).
      overshoot: the returned perturbation is ``(1 + overshoot) r``.
      max_iter: maximum number of linearisation steps (0 returns no flip).
      bounds: optional ``(low, high)``: the perturbed point is clipped to this
        box at every step (as foolbox does); ``None`` (default, SPEC) never clips.

    Returns:
      ``MarginResult``; ``converged`` says whether the label flipped, and
      ``margin`` is ``inf`` when it did not.

    References:
      Moosavi-Dezfooli, Fawzi, Frossard. "DeepFool: a simple and accurate method
      to fool deep neural networks", CVPR 2016. https://arxiv.org/abs/1511.04599
    """
    x, candidates, bounds = _check_margin_args(
        "deepfool", apply_fn, params, x, candidates, overshoot, max_iter, bounds
    )
    return _deepfool_core(
        apply_fn,
        params,
        x,
        jnp.asarray(overshoot, x.dtype),
        None,
        project=None,
        candidates=candidates,
        max_iter=max_iter,
        bounds=bounds,
    )


def _project(subspace: Any, w: jax.Array) -> jax.Array:
    return subspace.project(w)


def subspace_deepfool(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    subspace: subspaces_lib.Subspace,
    *,
    candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 100,
    bounds: tuple[float, float] | None = None,
) -> MarginResult:
    """Minimal L2 perturbation INSIDE a subspace that flips the label of one example.

    The DeepFool iteration with every gradient difference projected onto the
    subspace S: ``w_k <- P_S w_k``, ``pert_k = |g_k| / ||P_S w_k||``, so every step
    and the returned perturbation lie in S. Its norm is the margin along S of
    "Hold me tight!": small along discriminative directions, very large (or no
    flip within ``max_iter``) along directions the network is invariant to. With
    S the whole space (``bgeom.subspaces.whole``) this is exactly ``deepfool``.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters (any pytree); traced.
      x: one example of shape (H, W, C).
      subspace: ONE subspace from ``bgeom.subspaces`` (``dct_blocks(...)[i]``,
        ``random``, ``from_basis``, ``band``, ``whole``) of images shaped like
        ``x``; to sweep a stack of subspaces, ``jax.vmap`` over it or use
        ``subspace_margins``.
      candidates: number of top classes considered (at least 2).
      overshoot: the returned perturbation is ``(1 + overshoot) r``.
      max_iter: maximum number of steps (the paper's default is 100).
      bounds: optional ``(low, high)`` box the perturbed point is clipped to
        (clipping can move it out of S; ``None``, the paper's setting, never clips).

    Returns:
      ``MarginResult``; ``margin`` is ``inf`` when the label did not flip.

    References:
      Ortiz-Jimenez, Modas, Moosavi-Dezfooli, Frossard. "Hold me tight! Influence
      of discriminative features on deep network boundaries", NeurIPS 2020.
      https://arxiv.org/abs/2002.06349
    """
    x, candidates, bounds = _check_margin_args(
        "subspace_deepfool", apply_fn, params, x, candidates, overshoot, max_iter, bounds
    )
    subspaces_lib.check_compatible(subspace, x.shape, "subspace_deepfool")
    return _deepfool_core(
        apply_fn,
        params,
        x,
        jnp.asarray(overshoot, x.dtype),
        subspace,
        project=_project,
        candidates=candidates,
        max_iter=max_iter,
        bounds=bounds,
    )


def subspace_margins(
    apply_fn: Callable,
    params: Any,
    xs: jax.Array,
    subspaces: subspaces_lib.Subspace,
    *,
    candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 100,
    bounds: tuple[float, float] | None = None,
) -> MarginResult:
    """Margins of N examples along each of M stacked subspaces, in one jitted call.

    ``subspace_deepfool`` vmapped over the examples and over the stack, e.g. a
    whole margin-by-frequency profile: ``subspace_margins(f, p, xs, dct_blocks(...))``.

    Args:
      xs: a batch ``(N, H, W, C)``.
      subspaces: a stack of M subspaces (e.g. ``dct_blocks(shape)``).
      candidates, overshoot, max_iter, bounds: as in ``subspace_deepfool``.

    Returns:
      ``MarginResult`` whose fields have leading axes ``(N, M)``.
    """
    xs = jnp.asarray(xs)
    if xs.ndim != 4:
        raise ValueError(
            f"subspace_margins expects a batch of shape (N, H, W, C); got shape {xs.shape}."
        )
    if not isinstance(subspaces, subspaces_lib.MaskSubspace | subspaces_lib.BasisSubspace) or (
        len(subspaces.batch_shape) != 1
    ):
        raise ValueError(
            "subspace_margins expects a stack of subspaces (e.g. bgeom.subspaces.dct_blocks); "
            "for one subspace use subspace_deepfool, or stack them with bgeom.subspaces.stack."
        )
    x0, candidates, bounds = _check_margin_args(
        "subspace_margins", apply_fn, params, xs[0], candidates, overshoot, max_iter, bounds
    )
    subspaces_lib.check_compatible(subspaces[0], x0.shape, "subspace_margins")
    if _checks.is_concrete(xs) and not bool(jnp.all(jnp.isfinite(xs))):
        raise ValueError("subspace_margins got inputs with NaN or Inf values; clean them first.")
    return _subspace_grid(
        apply_fn,
        params,
        xs,
        jnp.asarray(overshoot, xs.dtype),
        subspaces,
        candidates=candidates,
        max_iter=max_iter,
        bounds=bounds,
    )


@functools.partial(jax.jit, static_argnames=("apply_fn", "candidates", "max_iter", "bounds"))
def _subspace_grid(apply_fn, params, xs, overshoot, subspaces, *, candidates, max_iter, bounds):
    def one(x, s):
        return _deepfool_core(
            apply_fn,
            params,
            x,
            overshoot,
            s,
            project=_project,
            candidates=candidates,
            max_iter=max_iter,
            bounds=bounds,
        )

    return jax.vmap(lambda x: jax.vmap(lambda s: one(x, s))(subspaces))(xs)


# ------------------------------------------------------------ targeted DeepFool


def _check_class_index(value: Any, name: str, num_classes: int, fn_name: str) -> jax.Array:
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


@functools.partial(jax.jit, static_argnames=("apply_fn", "max_iter", "bounds"))
def _targeted_core(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    target: jax.Array,
    overshoot: jax.Array,
    *,
    max_iter: int,
    bounds: tuple[float, float] | None,
) -> MarginResult:
    """The targeted DeepFool iteration (see ``targeted_deepfool``)."""
    f = lambda z: apply_fn(params, z)
    num_classes = jax.eval_shape(f, x).shape[0]
    is_target = jax.nn.one_hot(target, num_classes, dtype=x.dtype)
    scale = 1.0 + overshoot

    def point(r):
        z = x + scale * r
        return z if bounds is None else jnp.clip(z, bounds[0], bounds[1])

    def body(state):
        i, r, _, _ = state
        # One forward pass per step both tests the label of the current point
        # and linearises there (a step is taken only if the target is not reached).
        logits, vjp = jax.vjp(f, point(r))
        reached = jnp.argmax(logits) == target
        # The one boundary that matters is between the target and its strongest
        # rival at the current point (the current label while the target is not
        # reached): linearise F = f_target - f_rival and step onto F = 0.
        rival = jnp.argmax(jnp.where(is_target > 0, -jnp.inf, logits))
        cotangent = is_target - jax.nn.one_hot(rival, num_classes, dtype=logits.dtype)
        (w,) = vjp(cotangent)
        g = cotangent @ logits
        w_norm = jnp.linalg.norm(w.ravel())
        ok = (w_norm > 0) & jnp.isfinite(w_norm) & jnp.isfinite(g) & jnp.all(jnp.isfinite(logits))
        safe = jnp.where(ok, w_norm, 1.0)
        step = (jnp.abs(g) / safe + _STEP_EPS) * w / safe
        move = ok & ~reached
        return i + move.astype(jnp.int32), jnp.where(move, r + step, r), reached, ok | reached

    def cond(state):
        i, _, reached, ok = state
        return (i < max_iter) & ~reached & ok

    init = (jnp.asarray(0, jnp.int32), jnp.zeros_like(x), jnp.asarray(False), jnp.asarray(True))
    iterations, r, _, ok = jax.lax.while_loop(cond, body, init)
    # Clean and final logits in one batched call (the final point is tested once more
    # so that a run stopped by max_iter reports its true label).
    logits0, logits_end = jax.vmap(f)(jnp.stack([x, point(r)]))
    k0, adv_label = jnp.argmax(logits0), jnp.argmax(logits_end)
    perturbation = point(r) - x
    norm = jnp.linalg.norm(perturbation.ravel())
    finite = jnp.all(jnp.isfinite(logits0)) & jnp.all(jnp.isfinite(logits_end))
    converged = (adv_label == target) & ok & jnp.isfinite(norm) & finite
    return MarginResult(
        perturbation=perturbation,
        margin=jnp.where(converged, norm, jnp.inf),
        label=k0.astype(jnp.int32),
        adv_label=adv_label.astype(jnp.int32),
        iterations=iterations,
        converged=converged,
    )


def targeted_deepfool(
    apply_fn: Callable,
    params: Any,
    x: jax.Array,
    target: int | jax.Array,
    *,
    overshoot: float = 0.02,
    max_iter: int = 50,
    bounds: tuple[float, float] | None = None,
) -> MarginResult:
    """Small L2 perturbation that moves ONE example into a chosen class (targeted DeepFool).

    DeepFool with the target as the only candidate. From ``r = 0``, at
    ``z = x + (1 + overshoot) r``, let ``c`` be the strongest class other than
    the target at ``z``; with ``w = grad f_t(z) - grad f_c(z)`` and
    ``g = f_t(z) - f_c(z)`` (negative until the target wins) the step is
    ``r += (|g| / ||w|| + 1e-4) w / ||w||``. It stops as soon as
    ``k(x + (1 + overshoot) r) == target`` or after ``max_iter`` steps and
    returns ``(1 + overshoot) r``. Following the current rival (not only the
    clean label) keeps the iteration going when it passes through a third class.
    On a two-class affine classifier this is exactly ``deepfool``.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters (any pytree); traced.
      x: one example of shape (H, W, C).
      target: the class to reach, an integer (traced: ``jax.vmap`` over targets works).
      overshoot: the returned perturbation is ``(1 + overshoot) r``.
      max_iter: maximum number of linearisation steps (0 returns no move).
      bounds: optional ``(low, high)`` box the perturbed point is clipped to at
        every step; ``None`` (default) never clips.

    Returns:
      ``MarginResult`` with ``adv_label`` the prediction at ``x + perturbation``;
      ``converged`` is True iff that prediction is ``target`` (and all is
      finite), ``margin`` is ``inf`` otherwise. If ``x`` is already classified
      as ``target`` the result is a zero perturbation, ``iterations == 0``,
      ``margin == 0`` and ``converged`` True (so, unlike ``deepfool``,
      ``converged`` does not imply ``adv_label != label``).

    References:
      Moosavi-Dezfooli, Fawzi, Frossard. "DeepFool: a simple and accurate method
      to fool deep neural networks", CVPR 2016. https://arxiv.org/abs/1511.04599
      Fawzi, Moosavi-Dezfooli, Frossard, Soatto. "Classification regions of
      deep neural networks", 2017 (CVPR 2018); targeted pushes build the paths
      of ``bgeom.find_path``. https://arxiv.org/abs/1705.09552
    """
    x, _, bounds = _check_margin_args(
        "targeted_deepfool", apply_fn, params, x, 2, overshoot, max_iter, bounds
    )
    num_classes = _checks.check_logits(apply_fn, params, x, "targeted_deepfool")
    target = _check_class_index(target, "target", num_classes, "targeted_deepfool")
    return _targeted_core(
        apply_fn,
        params,
        x,
        target,
        jnp.asarray(overshoot, x.dtype),
        max_iter=max_iter,
        bounds=bounds,
    )
