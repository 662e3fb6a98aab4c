"""Margins: the minimal L2 perturbation that changes a classifier's label.

``deepfool`` is the multi-class L2 DeepFool of Moosavi-Dezfooli et al.;
``subspace_deepfool`` is the same iteration restricted to a subspace (the margins
along subspaces of "Hold me tight!"), and ``subspace_margins`` computes them for
N samples x M subspaces in one jitted call. See docs/margins.md. Every
function works on ONE example (``subspace_margins`` is their vmap) and composes
with ``jax.jit`` and ``jax.vmap``; no Python loop runs over samples or classes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bgeom import _checks, boundary, engine
from bgeom import subspaces as subspaces_lib
from bgeom.sharding import split_over_processes

# ``MarginResult.status`` codes (index into STATUS_NAMES).
CONVERGED = 0  # the label flipped (targeted: reached the target)
MAX_ITER = 1  # max_iter steps without flipping
NONFINITE = 2  # NaN/Inf logits or gradients
# Every (projected) gradient difference is zero: to first order no step (in the
# subspace) changes the label, e.g. a subspace the network is invariant to.
ZERO_GRADIENT = 3
STATUS_NAMES = ("converged", "max_iter", "nonfinite", "zero_gradient")


class MarginResult(NamedTuple):
    """Outcome of a margin computation for one example.

    Attributes:
      perturbation: the returned perturbation ``(1 + overshoot) r``, shape of ``x``.
      margin: its L2 norm when ``converged``; ``inf`` when the label did not flip,
        so a failed search is never mistaken for a margin.
      label: the model's own prediction at ``x`` (not the ground truth).
      adv_label: the prediction at ``x + perturbation``.
      iterations: number of linearisation steps taken.
      converged: True iff ``adv_label != label`` (targeted: ``== target``) and
        every quantity is finite.
      status: why, an index into ``STATUS_NAMES`` (0 iff ``converged``).
    """

    perturbation: jax.Array
    margin: jax.Array
    label: jax.Array
    adv_label: jax.Array
    iterations: jax.Array
    converged: jax.Array
    status: jax.Array


def _result(search: boundary.Search) -> MarginResult:
    """The ``MarginResult`` of a finished search."""
    converged = search.reached & search.finite
    stopped = jnp.where(search.stalled, ZERO_GRADIENT, MAX_ITER)
    status = jnp.where(search.finite, jnp.where(search.reached, CONVERGED, stopped), NONFINITE)
    norm = jnp.linalg.norm(search.perturbation.ravel())
    return MarginResult(
        perturbation=search.perturbation,
        margin=jnp.where(converged, norm, jnp.inf),
        label=search.label,
        adv_label=search.adv_label,
        iterations=search.iterations,
        converged=converged,
        status=status.astype(jnp.int32),
    )


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _deepfool_core(apply_fn, params, x, options, subspace) -> MarginResult:
    return _result(boundary.deepfool_search(apply_fn, params, x, options, subspace))


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
    on an affine classifier this is the exact one-step answer (docs/margins.md).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters (any pytree); traced.
      x: one example of shape (H, W, C).
      candidates: number of top classes considered (capped at the number of
        classes; at least 2).
      overshoot: the returned perturbation is ``(1 + overshoot) r``.
      max_iter: maximum number of linearisation steps (0 returns no flip).
      bounds: optional ``(low, high)``: the perturbed point is clipped to this
        box at every step (as foolbox does); ``None`` (default, as in the paper) never clips.

    Returns:
      ``MarginResult``; ``converged`` says whether the label flipped, and
      ``margin`` is ``inf`` when it did not.

    References:
      Method page: docs/margins.md.
      Moosavi-Dezfooli, Fawzi, Frossard. "DeepFool: a simple and accurate method
      to fool deep neural networks", CVPR 2016. https://arxiv.org/abs/1511.04599
    """
    options = boundary.DeepFoolOptions(candidates, overshoot, max_iter, bounds)
    x, options = options.checked("deepfool", apply_fn, params, x)
    return _deepfool_core(apply_fn, params, x, options, None)


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
      Method page: docs/margins.md.
      Ortiz-Jimenez, Modas, Moosavi-Dezfooli, Frossard. "Hold me tight! Influence
      of discriminative features on deep network boundaries", NeurIPS 2020.
      https://arxiv.org/abs/2002.06349
    """
    options = boundary.DeepFoolOptions(candidates, overshoot, max_iter, bounds)
    x, options = options.checked("subspace_deepfool", apply_fn, params, x)
    subspaces_lib.check_compatible(subspace, x.shape, "subspace_deepfool")
    return _deepfool_core(apply_fn, params, x, options, subspace)


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
    batch_size: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = False,
    desc: str = "subspace margins",
) -> MarginResult:
    """Margins of N examples along each of M stacked subspaces.

    ``subspace_deepfool`` for every (example, subspace) pair, e.g. a whole
    margin-by-frequency profile: ``subspace_margins(f, p, xs, dct_blocks(...))``.
    The first linearisation of an example (a forward pass and the candidates'
    gradients at ``x``, usually most of the work) is computed once and its
    gradients analysed once (``analyse``: the DCT for DCT masks); each of its M
    subspaces reads its coordinates from them, and every search synthesises
    only the step it takes. The rest of the searches run
    through ``bgeom.engine`` (top-level jitted steps, finished pairs leave the
    batch at once). Equals ``jax.vmap`` of ``subspace_deepfool`` over both
    axes up to float rounding.

    Args:
      xs: a batch ``(N, H, W, C)``.
      subspaces: a stack of M subspaces (e.g. ``dct_blocks(shape)``).
      candidates, overshoot, max_iter, bounds: as in ``subspace_deepfool``.
      batch_size: pairs in flight at once (memory bound); ``None``:
        ``engine.default_batch_size`` per device (on a CPU 64 when the model
        has convolutions, 256 when not; 256 on an accelerator).
      devices: the devices the pairs in flight are split over; ``None``:
        every local device. In a multi-process run every process makes the
        same call, computes the margins of its share of the images and gets
        all of them (as ``bgeom.batched``).
      progress, desc: a progress bar of finished pairs.

    Returns:
      ``MarginResult`` of NumPy arrays whose fields have leading axes ``(N, M)``.
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
    options = boundary.DeepFoolOptions(candidates, overshoot, max_iter, bounds)
    x0, options = options.checked("subspace_margins", apply_fn, params, xs[0])
    subspaces_lib.check_compatible(subspaces[0], x0.shape, "subspace_margins")
    boundary.check_batch(xs, "subspace_margins")
    m = len(subspaces)

    def share(xs: jax.Array) -> MarginResult:
        n = xs.shape[0]
        tables = _first_steps(apply_fn, params, jnp.asarray(xs), options, subspaces)
        images, blocks = np.meshgrid(np.arange(n), np.arange(m), indexing="ij")
        out, _ = engine.run(
            _pair_iterative(apply_fn),
            tables,
            images.ravel(),
            blocks.ravel(),
            batch_size=batch_size,
            devices=devices,
            progress=progress,
            desc=desc,
        )
        return jax.tree.map(lambda a: a.reshape(n, m, *a.shape[1:]), out)

    return split_over_processes(share, xs)


class _Tables(NamedTuple):
    """What the (image, subspace) searches of ``subspace_margins`` share."""

    params: Any
    options: boundary.DeepFoolOptions
    subspaces: Any  # the stack
    start: boundary.DeepFoolState  # every image's initial state (no subspace yet)
    first: boundary.Linearisation  # every image's first linearisation, gradients analysed


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _first_steps(apply_fn, params, xs, options, subspaces) -> _Tables:
    """Each image's initial state and first linearisation, shared by all its subspaces."""
    c = boundary.Shared(params, options)
    it = boundary.deepfool_iterative(apply_fn, True)
    start = jax.vmap(lambda x: it.init(c, x, None))(xs)
    first = jax.vmap(lambda s: boundary.linearise_state(apply_fn, c, s, subspaces.analyse))(start)
    return _Tables(params, options, subspaces, start, first)


@functools.lru_cache(maxsize=64)
def _pair_iterative(apply_fn: Callable) -> engine.Iterative:
    """Subspace DeepFool of one (image, subspace) pair, its first step from the shared tables."""
    base = boundary.deepfool_iterative(apply_fn, True)

    def init(c: _Tables, image: jax.Array, block: jax.Array) -> boundary.DeepFoolState:
        subspace = jax.tree.map(lambda a: a[block], c.subspaces)
        s = jax.tree.map(lambda a: a[image], c.start)._replace(subspace=subspace)
        if c.options.max_iter == 0:
            return s
        first = jax.tree.map(lambda a: a[image], c.first)
        first = first._replace(w=jax.vmap(subspace.coordinates)(first.w))
        return boundary.deepfool_advance(apply_fn, c, s, first, subspace.synthesise)

    def finish(c: _Tables, s: boundary.DeepFoolState) -> MarginResult:
        return _result(base.finish(c, s))

    return base._replace(init=init, finish=finish)


# ------------------------------------------------------------ targeted DeepFool


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _targeted_core(apply_fn, params, x, target, options) -> MarginResult:
    return _result(boundary.targeted_search(apply_fn, params, x, target, options))


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
      Method page: docs/margins.md.
      Moosavi-Dezfooli, Fawzi, Frossard. "DeepFool: a simple and accurate method
      to fool deep neural networks", CVPR 2016. https://arxiv.org/abs/1511.04599
      Fawzi, Moosavi-Dezfooli, Frossard, Soatto. "Classification regions of
      deep neural networks", 2017 (CVPR 2018); targeted pushes build the paths
      of ``bgeom.find_path``. https://arxiv.org/abs/1705.09552
    """
    fn = "targeted_deepfool"
    options = boundary.DeepFoolOptions(2, overshoot, max_iter, bounds)
    x, options = options.checked(fn, apply_fn, params, x)
    num_classes = _checks.check_logits(apply_fn, params, x, fn)
    target = boundary.check_class_index(target, "target", num_classes, fn)
    return _targeted_core(apply_fn, params, x, target, options)


# ------------------------------------------------------------ batched forms


@functools.lru_cache(maxsize=128)
def _margin_iterative(apply_fn: Callable, kind: str) -> engine.Iterative:
    """DeepFool, subspace DeepFool or targeted DeepFool, finishing with a ``MarginResult``."""
    if kind == "targeted":
        base = boundary.targeted_iterative(apply_fn)
    else:
        base = boundary.deepfool_iterative(apply_fn, kind == "subspace")
    return base._replace(finish=lambda c, s: _result(base.finish(c, s)))


def _checked_options(fn: Callable, apply_fn, params, xs, options) -> boundary.Shared:
    name = f"bgeom.batched({fn.__name__})"
    boundary.check_batch(xs, name)
    _, opts = boundary.options_of(fn, name, options).checked(name, apply_fn, params, xs[0])
    return boundary.Shared(params, opts)


@engine.register(deepfool)
def _deepfool_plan(apply_fn, params, xs, **options):
    shared = _checked_options(deepfool, apply_fn, params, xs, options)
    return _margin_iterative(apply_fn, "untargeted"), shared, (xs,)


@engine.register(subspace_deepfool)
def _subspace_deepfool_plan(apply_fn, params, xs, subspace, **options):
    shared = _checked_options(subspace_deepfool, apply_fn, params, xs, options)
    stacked = len(getattr(subspace, "batch_shape", ())) == 1
    one = subspace[0] if stacked else subspace
    subspaces_lib.check_compatible(one, xs.shape[1:], "bgeom.batched(subspace_deepfool)")
    if stacked and len(subspace) != len(xs):
        raise ValueError(
            f"bgeom.batched(subspace_deepfool): give one subspace, or a stack of one per image "
            f"({len(xs)}); got a stack of {len(subspace)}. For every image along every subspace "
            "use bgeom.subspace_margins."
        )
    if not stacked:
        subspace = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(xs), *a.shape)), subspace)
    return _margin_iterative(apply_fn, "subspace"), shared, (xs, subspace)


@engine.register(targeted_deepfool)
def _targeted_plan(apply_fn, params, xs, target, **options):
    shared = _checked_options(targeted_deepfool, apply_fn, params, xs, options)
    target = jnp.asarray(target)
    if target.shape != xs.shape[:1] or not jnp.issubdtype(target.dtype, jnp.integer):
        raise ValueError(
            f"bgeom.batched(targeted_deepfool): target must give one integer class per image, "
            f"shape ({len(xs)},); got {tuple(target.shape)} {target.dtype}."
        )
    return _margin_iterative(apply_fn, "targeted"), shared, (xs, target.astype(jnp.int32))
