"""Borderline instances: points on the decision boundary between two classes (DeepDIG).

After Karimi, Tang and Derr, "Characterizing the decision boundary of deep
neural networks" (DeepDIG). For a source class ``s`` and a target class ``t``:

- (I) an autoencoder ``G1`` is trained on class-``s`` training images with the
  loss ``BCE(G1(x), x) + alpha * BCE(softmax f(G1(x)), onehot t)``; the
  images ``G1(x)`` with ``f(x) = s`` and ``f(G1(x)) = t`` form the adversarial
  set ``A``;
- (II) a second autoencoder ``G2`` is trained the same way on ``A`` (from the
  training images only) with target ``s``; it is evaluated on held-out
  adversarial images (``G1`` of the test images): the pairs ``(a, G2(a))``
  with ``f(a) = t`` and ``f(G2(a)) = s`` are kept;
- (III) ``borderline_search`` bisects each segment ``[a, G2(a)]`` until the
  softmax probabilities of the two classes agree to ``tol``: a borderline
  instance.

The generators are Flax NNX modules trained through ``bgeom.train.train_loop``
(Adam, step decay; checkpointed, so re-runs reuse them). All pairs of a phase
train together as one stacked generator: one compilation, one classifier call
on every pair's batch per step; Adam updates every parameter on its own, so
each generator trains as it would alone.

Characteristics of the boundary the instances reveal:

- input-space complexity (``input_complexity``): label changes along segments
  between borderline instances;
- embedding-space linearity (``embedding_linearity``): a linear SVM on the
  penultimate features of the two classes, its accuracy and the normalised
  signed distances of training, test and borderline points;
- both for DeepDIG's instances and for the baselines RPBS (``random_pairs``)
  and EPBS (``embedding_nearest_pairs``), searched with the same bisection.

``borderline_search`` and ``label_changes`` are pure functions of one pair
(jit, vmap); ``borderline_searches`` and ``input_complexity`` run many through
one compiled, chunked map. See docs/borderline.md.

References:
  Karimi, Tang, Derr. "Characterizing the decision boundary of deep neural
  networks", 2019. https://arxiv.org/abs/1912.11460 (reference code:
  https://github.com/hamidkarimi/DeepDIG).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bgeom import _checks, train
from bgeom.models import ApplyFn, unstack
from bgeom.paths import _rng

# ``BorderlineResult.status`` codes (index into STATUS_NAMES).
CONVERGED = 0  # a midpoint with |p_source - p_target| < tol, classified source or target
THIRD_CLASS = 1  # a midpoint fell in a class other than source and target
SAME_CLASS = 2  # both endpoints have the same label: nothing to search
MAX_HALVINGS = 3  # max_halvings midpoints without reaching the tolerance
NONFINITE = 4  # NaN/Inf logits at an endpoint or a midpoint
STATUS_NAMES = ("converged", "third_class", "same_class", "max_halvings", "nonfinite")

# Generator architectures: a fully connected autoencoder for small images, a
# convolutional one for larger ones ("auto" chooses by the input dimension).
ARCHITECTURES = ("auto", "dense", "conv")
DENSE_MAX_DIM = 1024
DEFAULT_HIDDEN = {"dense": (100, 50), "conv": (12, 24, 48)}

# Examples per compiled call of the batched helpers; inputs are padded to a
# multiple of it so that one compiled function serves every call.
CHUNK = 256


# ------------------------------------------------------------------ the search


class BorderlineResult(NamedTuple):
    """The bisection of one segment ``[a, b]`` onto the boundary of its end labels.

    Attributes:
      point: the last midpoint evaluated (``a`` when none was), shape (H, W, C):
        a borderline instance when ``converged``.
      converged: ``|p_source - p_target| < tol`` at ``point`` and ``point`` is
        classified ``source`` or ``target`` (``status == 0``).
      status: why the search ended, an index into ``STATUS_NAMES``.
      halvings: midpoints evaluated (each halves the bracket).
      gap: ``|p_source - p_target|`` (softmax probabilities) at ``point``.
      source: the model's label at ``a``.
      target: the model's label at ``b``.
    """

    point: jax.Array
    converged: jax.Array
    status: jax.Array
    halvings: jax.Array
    gap: jax.Array
    source: jax.Array
    target: jax.Array


class _Bisection(NamedTuple):
    halvings: jax.Array  # midpoints evaluated
    lo: jax.Array  # position of the source-side end of the bracket, in [0, 1]
    hi: jax.Array  # position of the target-side end
    t: jax.Array  # position of the last midpoint
    gap: jax.Array  # |p_source - p_target| there
    label: jax.Array  # its label
    finite: jax.Array  # every logit so far was finite
    stop: jax.Array


def _on_segment(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    # (1 - t) a + t b hits both endpoints exactly, unlike a + t (b - a).
    return (1 - t) * a + t * b


@functools.partial(jax.jit, static_argnames=("apply_fn", "max_halvings"))
def _search_core(apply_fn, params, a, b, tol, *, max_halvings):
    f = lambda z: apply_fn(params, z)
    ends = jax.vmap(f)(jnp.stack([a, b]))
    source, target = jnp.argmax(ends, axis=-1).astype(jnp.int32)
    finite_ends = jnp.all(jnp.isfinite(ends))

    def gap_of(logits: jax.Array) -> jax.Array:
        p = jax.nn.softmax(logits)
        return jnp.abs(p[source] - p[target])

    def step(s: _Bisection) -> _Bisection:
        t = (s.lo + s.hi) / 2
        logits = f(_on_segment(a, b, t))
        label = jnp.argmax(logits).astype(jnp.int32)
        gap = gap_of(logits)
        finite = jnp.all(jnp.isfinite(logits))
        third = (label != source) & (label != target)
        return _Bisection(
            halvings=s.halvings + 1,
            lo=jnp.where(label == source, t, s.lo),
            hi=jnp.where(label == target, t, s.hi),
            t=t,
            gap=gap,
            label=label,
            finite=finite,
            stop=(gap < tol) | third | ~finite,
        )

    def running(s: _Bisection) -> jax.Array:
        return ~s.stop & (s.halvings < max_halvings)

    zero = jnp.zeros((), a.dtype)
    init = _Bisection(
        halvings=jnp.asarray(0, jnp.int32),
        lo=zero,
        hi=jnp.ones((), a.dtype),
        t=zero,
        gap=gap_of(ends[0]),
        label=source,
        finite=finite_ends,
        stop=~finite_ends | (source == target),
    )
    end = jax.lax.while_loop(running, step, init)
    third = (end.label != source) & (end.label != target)
    status = jnp.where(end.gap < tol, CONVERGED, MAX_HALVINGS)
    status = jnp.where(third, THIRD_CLASS, status)
    status = jnp.where(source == target, SAME_CLASS, status)
    status = jnp.where(finite_ends & end.finite, status, NONFINITE).astype(jnp.int32)
    return BorderlineResult(
        point=_on_segment(a, b, end.t),
        converged=status == CONVERGED,
        status=status,
        halvings=end.halvings,
        gap=end.gap,
        source=source,
        target=target,
    )


def _check_tol(tol: Any, fn: str) -> None:
    """``tol`` must be in (0, 1] (checked when its value is known)."""
    if not _checks.is_concrete(tol):
        return
    try:
        value = float(tol)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= 1:
        raise ValueError(
            f"{fn}: tol must be a number in (0, 1], the largest accepted gap |p_s - p_t| "
            f"between two softmax probabilities (the reference uses 1e-4); got {tol!r}."
        )


def _check_endpoints(a: Any, b: Any, fn: str) -> tuple[jax.Array, jax.Array]:
    a = _checks.check_example(a, fn)
    b = _checks.check_example(b, fn)
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: a and b must be two images of the same shape; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}. Pass one pair of model inputs (map over pairs with jax.vmap)."
        )
    dtype = jnp.result_type(a, b)
    return a.astype(dtype), b.astype(dtype)


def borderline_search(
    apply_fn: Callable,
    params: Any,
    a: jax.Array,
    b: jax.Array,
    *,
    tol: float = 1e-4,
    max_halvings: int = 60,
) -> BorderlineResult:
    """Bisect the segment ``[a, b]`` onto the boundary between the labels of its ends.

    With ``s = k(a)`` and ``t = k(b)`` (the model's own labels), the search
    evaluates the midpoint ``m`` of the current bracket: it stops when
    ``|p_s(m) - p_t(m)| < tol`` (softmax probabilities), fails when ``m`` is
    classified neither ``s`` nor ``t``, and otherwise replaces the end whose
    label ``m`` shares. At most ``max_halvings`` midpoints are evaluated (the
    reference code has no cap; in float32 the bracket stops shrinking after
    about 24 halvings). A pure, fixed-shape ``lax.while_loop``: it composes with
    ``jax.jit`` and ``jax.vmap`` (over pairs and parameters).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters (any pytree); traced.
      a, b: the two ends, images of the same shape (H, W, C).
      tol: the largest accepted gap ``|p_s - p_t|``, in (0, 1]; traced (a new
        value does not recompile).
      max_halvings: most midpoints evaluated (>= 1); static.

    Returns:
      ``BorderlineResult``; ``status`` (``STATUS_NAMES``) says why a search did
      not converge: ``third_class``, ``same_class``, ``max_halvings`` or
      ``nonfinite``. Never an exception under jit.

    References:
      Karimi, Tang, Derr, 2019, https://arxiv.org/abs/1912.11460 ;
      docs/borderline.md.
    """
    fn = "borderline_search"
    if not callable(apply_fn):
        raise ValueError(f"{fn}: apply_fn must be callable as apply_fn(params, x).")
    a, b = _check_endpoints(a, b, fn)
    _checks.check_logits(apply_fn, params, a, fn)
    _check_tol(tol, fn)
    max_halvings = _checks.check_positive_int(max_halvings, "max_halvings", fn, minimum=1)
    return _search_core(
        apply_fn, params, a, b, jnp.asarray(tol, a.dtype), max_halvings=max_halvings
    )


# ------------------------------------------------------------------ many at once


def _vmap_map(fn: Callable, *args: Any, in_axes: Any, batch_size: int | None = None, desc=""):
    """The default ``map_fn``: ``bgeom.sweep`` without a progress bar."""
    from bgeom.sharding import sweep

    return sweep(fn, *args, in_axes=in_axes, batch_size=batch_size, progress=False, desc=desc)


def _chunked(map_fn: Callable | None, fn: Callable, params: Any, mapped: Sequence[Any], *rest: Any):
    """``fn(params, *row, *rest)`` over the rows of ``mapped``, padded to a multiple of ``CHUNK``.

    The padding (copies of the last row) keeps every call at the chunk shape,
    so one compiled function serves every size; it is dropped from the result.
    """
    map_fn = map_fn or _vmap_map
    n = len(mapped[0])
    pad = (-n) % CHUNK
    rows = [np.concatenate([m, np.repeat(m[-1:], pad, axis=0)]) if pad else m for m in mapped]
    in_axes = (None, *(0 for _ in rows), *(None for _ in rest))
    out = map_fn(fn, params, *rows, *rest, in_axes=in_axes, batch_size=CHUNK, desc="borderline")
    return jax.tree.map(lambda v: np.asarray(v)[:n], out)


def split_rows(values: Any, sizes: Sequence[int]) -> list[np.ndarray]:
    """``values`` cut along its first axis into consecutive parts of ``sizes`` rows."""
    values = np.asarray(values)
    return np.split(values, np.cumsum(sizes)[:-1]) if len(sizes) else []


def split_results(result: Any, sizes: Sequence[int]) -> list[Any]:
    """A NamedTuple of arrays (e.g. ``BorderlineResult``) cut into parts of ``sizes`` rows."""
    parts = [split_rows(v, sizes) for v in result]
    return [type(result)(*(part[i] for part in parts)) for i in range(len(sizes))]


@dataclasses.dataclass(frozen=True)
class _Labels:
    """``k(x)`` of one example; hashable by value, so mapped calls reuse compiled code."""

    apply_fn: Callable

    def __call__(self, params: Any, x: jax.Array) -> jax.Array:
        return jnp.argmax(self.apply_fn(params, x)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Search:
    apply_fn: Callable
    max_halvings: int

    def __call__(self, params: Any, a: jax.Array, b: jax.Array, tol: jax.Array):
        return _search_core(self.apply_fn, params, a, b, tol, max_halvings=self.max_halvings)


def predict(apply_fn: Callable, params: Any, x: Any, *, map_fn: Callable | None = None):
    """The model's labels ``k(x)`` of a batch ``x`` (N, H, W, C), as an int32 NumPy array."""
    x = np.asarray(x)
    if len(x) == 0:
        return np.zeros(0, np.int32)
    return _chunked(map_fn, _Labels(apply_fn), params, [x])


def borderline_searches(
    apply_fn: Callable,
    params: Any,
    a: Any,
    b: Any,
    *,
    tol: float = 1e-4,
    max_halvings: int = 60,
    map_fn: Callable | None = None,
) -> BorderlineResult:
    """``borderline_search`` on every pair ``(a[i], b[i])``: one compiled, chunked map.

    Args:
      apply_fn, params: the model.
      a, b: (N, H, W, C) the ends of N segments.
      tol, max_halvings: as in ``borderline_search``.
      map_fn: ``map_fn(fn, *args, in_axes=..., batch_size=..., desc=...)`` batches a
        per-example function (default: ``bgeom.sweep``; the suite passes its
        ``ctx.map``). Inputs are padded to a multiple of 256 pairs so that
        every call, whatever N, reuses one compiled search.

    Returns:
      ``BorderlineResult`` of NumPy arrays with a leading axis N.
    """
    fn = "borderline_searches"
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(
            f"{fn}: a and b must be batches (N, H, W, C) of the same shape; got {a.shape} and "
            f"{b.shape}."
        )
    _check_tol(tol, fn)
    max_halvings = _checks.check_positive_int(max_halvings, "max_halvings", fn, minimum=1)
    if len(a) == 0:
        empty = np.zeros(0, np.int32)
        return BorderlineResult(
            a.copy(), empty.astype(bool), empty, empty, empty + 0.0, empty, empty
        )
    _check_endpoints(a[0], b[0], fn)
    _checks.check_logits(apply_fn, params, jnp.asarray(a[0]), fn)
    tol = jnp.asarray(tol, jnp.result_type(a.dtype, b.dtype))
    return BorderlineResult(*_chunked(map_fn, _Search(apply_fn, max_halvings), params, [a, b], tol))


# ------------------------------------------------------------------ input-space complexity


class LabelChanges(NamedTuple):
    """Label changes along one segment (a plain evaluation).

    Attributes:
      changes: how many consecutive points of the segment differ in label.
      complexity: ``changes / num_points`` (DeepDIG's trajectory measure).
      converged: every logit along the segment was finite.
    """

    changes: jax.Array
    complexity: jax.Array
    converged: jax.Array


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_points"))
def _changes_core(apply_fn, params, x0, x1, *, num_points):
    t = (jnp.arange(num_points, dtype=x0.dtype) / num_points).reshape((-1,) + (1,) * x0.ndim)
    points = t * x0[None] + (1 - t) * x1[None]
    logits = jax.vmap(lambda z: apply_fn(params, z))(points)
    labels = jnp.argmax(logits, axis=-1)
    changes = jnp.sum(labels[1:] != labels[:-1]).astype(jnp.int32)
    return LabelChanges(
        changes=changes,
        complexity=changes.astype(x0.dtype) / num_points,
        converged=jnp.all(jnp.isfinite(logits)),
    )


def label_changes(
    apply_fn: Callable, params: Any, x0: jax.Array, x1: jax.Array, *, num_points: int = 50
) -> LabelChanges:
    """Label changes between consecutive points ``x(t) = t x0 + (1 - t) x1``, ``t = k / n``.

    ``n = num_points``, ``k = 0, ..., n - 1`` (DeepDIG's trajectory: from ``x1`` towards,
    but not including, ``x0``). ``complexity = changes / num_points``; a
    segment inside one region has 0, one that crosses a single boundary once
    has ``1 / num_points``.

    Args:
      apply_fn, params: the model.
      x0, x1: the two ends, images of the same shape.
      num_points: points per segment (>= 2); static.

    Returns:
      ``LabelChanges``; ``converged`` is False when a logit was not finite.

    References:
      Karimi, Tang, Derr, 2019, https://arxiv.org/abs/1912.11460 ;
      docs/borderline.md.
    """
    fn = "label_changes"
    x0, x1 = _check_endpoints(x0, x1, fn)
    _checks.check_logits(apply_fn, params, x0, fn)
    num_points = _checks.check_positive_int(num_points, "num_points", fn, minimum=2)
    return _changes_core(apply_fn, params, x0, x1, num_points=num_points)


@dataclasses.dataclass(frozen=True)
class _Changes:
    apply_fn: Callable
    num_points: int

    def __call__(self, params: Any, x0: jax.Array, x1: jax.Array) -> LabelChanges:
        return _changes_core(self.apply_fn, params, x0, x1, num_points=self.num_points)


class Complexity(NamedTuple):
    """DeepDIG's input-space complexity of a set of borderline instances.

    Attributes:
      mean: the mean ``complexity`` over every segment (``None`` without one).
      complexity: (M,) per segment.
      first, second: (M,) the indices of the two instances of each segment.
      converged: (M,) every logit along the segment was finite.
    """

    mean: float | None
    complexity: np.ndarray
    first: np.ndarray
    second: np.ndarray
    converged: np.ndarray


def complexity_pairs(key: jax.Array, n: int, partners: int) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``n`` instances with ``min(partners, n - 1)`` distinct others, drawn at random.

    Returns ``(first, second)`` index arrays of the segments.
    """
    rng = _rng(key)
    m = min(int(partners), n - 1)
    if m < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = np.repeat(np.arange(n), m)
    second = np.concatenate(
        [np.delete(np.arange(n), i)[rng.permutation(n - 1)[:m]] for i in range(n)]
    )
    return first, second


def input_complexity(
    key: jax.Array,
    apply_fn: Callable,
    params: Any,
    instances: Any,
    *,
    partners: int = 50,
    num_points: int = 50,
    map_fn: Callable | None = None,
) -> Complexity:
    """Input-space complexity of the boundary through a set of borderline instances.

    Each instance is joined to ``min(partners, n - 1)`` random other instances;
    ``label_changes`` counts the label changes along each segment, and the
    mean of ``changes / num_points`` is DeepDIG's complexity: 0 when every
    segment stays in one class, larger the more often segments between points
    of the boundary cross it.

    Args:
      key: PRNG key of the random partners.
      apply_fn, params: the model.
      instances: (n, H, W, C) borderline instances.
      partners: partners per instance (the reference: 50).
      num_points: points per segment (the reference: 50).
      map_fn: batches the segments, as in ``borderline_searches``.

    Returns:
      ``Complexity``.

    References:
      Karimi, Tang, Derr, 2019, https://arxiv.org/abs/1912.11460 ;
      docs/borderline.md.
    """
    return input_complexities(
        [key],
        apply_fn,
        params,
        [instances],
        partners=partners,
        num_points=num_points,
        map_fn=map_fn,
    )[0]


def input_complexities(
    keys: Sequence[jax.Array],
    apply_fn: Callable,
    params: Any,
    sets: Sequence[Any],
    *,
    partners: int = 50,
    num_points: int = 50,
    map_fn: Callable | None = None,
) -> list[Complexity]:
    """``input_complexity`` of several sets of instances (one key each), in one mapped call."""
    fn = "input_complexity"
    sets = [np.asarray(x) for x in sets]
    if len(keys) != len(sets):
        raise ValueError(f"{fn}: give one key per set of instances.")
    for x in sets:
        if x.ndim != 4:
            raise ValueError(f"{fn}: instances must be a batch (n, H, W, C); got {x.shape}.")
    partners = _checks.check_positive_int(partners, "partners", fn)
    num_points = _checks.check_positive_int(num_points, "num_points", fn, minimum=2)
    index = [complexity_pairs(k, len(x), partners) for k, x in zip(keys, sets, strict=True)]
    sizes = [len(first) for first, _ in index]
    if sum(sizes):
        some = next(x for x, n in zip(sets, sizes, strict=True) if n)
        _checks.check_logits(apply_fn, params, jnp.asarray(some[0]), fn)
        x0 = np.concatenate(
            [x[first] for x, (first, _) in zip(sets, index, strict=True) if len(first)]
        )
        x1 = np.concatenate(
            [x[second] for x, (_, second) in zip(sets, index, strict=True) if len(second)]
        )
        res = _chunked(map_fn, _Changes(apply_fn, num_points), params, [x0, x1])
        values = split_rows(np.asarray(res.complexity, np.float64), sizes)
        finite = split_rows(np.asarray(res.converged), sizes)
    else:
        values = [np.zeros(0) for _ in sets]
        finite = [np.zeros(0, bool) for _ in sets]
    return [
        Complexity(float(np.mean(v)) if v.size else None, v, first, second, ok)
        for v, ok, (first, second) in zip(values, finite, index, strict=True)
    ]


# ------------------------------------------------------------------ embedding-space linearity


class Linearity(NamedTuple):
    """A linear SVM between two classes in embedding space, and distances to its hyperplane.

    Attributes:
      accuracy: per set (``"train"`` and every set given), the SVM's accuracy.
      distance: per set, ``m / (1 + m)`` with ``m`` the mean of ``|d|``, ``d``
        the signed distance ``decision / ||w||`` (DeepDIG's normalisation).
      signed: per set, the signed distances ``d`` (positive on the target side).
      converged: liblinear converged within ``max_iter``.
    """

    accuracy: dict[str, float | None]
    distance: dict[str, float | None]
    signed: dict[str, np.ndarray]
    converged: bool


def embedding_linearity(
    train_source: Any,
    train_target: Any,
    sets: Mapping[str, tuple[Any, Any]],
    *,
    source: int,
    target: int,
    C: float = 1.0,
    max_iter: int = 10000,
) -> Linearity:
    """Fit ``LinearSVC(C)`` on the penultimate features of two classes and measure other sets.

    Args:
      train_source, train_target: (n, D) features of the training images of the
        source and the target class (the SVM's training set, reported as
        ``"train"``).
      sets: name -> ``(features (m, D), labels (m,))`` to evaluate, labels in
        ``{source, target}`` (DeepDIG labels the borderline instances of the
        direction ``s -> t`` with ``s``).
      source, target: the two classes.
      C, max_iter: scikit-learn's ``LinearSVC`` settings (the reference's).

    Returns:
      ``Linearity``; a set without rows has ``None`` accuracy and distance.

    References:
      Karimi, Tang, Derr, 2019, https://arxiv.org/abs/1912.11460 ;
      docs/borderline.md.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    fn = "embedding_linearity"
    xs, xt = np.asarray(train_source, np.float64), np.asarray(train_target, np.float64)
    if xs.ndim != 2 or xt.ndim != 2 or xs.shape[1] != xt.shape[1] or not len(xs) or not len(xt):
        raise ValueError(
            f"{fn}: train_source and train_target must be non-empty feature matrices (n, D) with "
            f"the same D; got {xs.shape} and {xt.shape}."
        )
    if source == target:
        raise ValueError(f"{fn}: source and target must be two different classes.")
    x = np.concatenate([xs, xt])
    y = np.r_[np.full(len(xs), source), np.full(len(xt), target)]
    svm = LinearSVC(C=C, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    # decision_function > 0 means classes_[1]; orient it so that d > 0 is the target side.
    sign = 1.0 if svm.classes_[1] == target else -1.0
    w_norm = float(np.linalg.norm(svm.coef_))
    accuracy, distance, signed = {}, {}, {}
    for name, (features, labels) in {"train": (x, y), **sets}.items():
        features = np.asarray(features, np.float64)
        if not len(features):
            accuracy[name], distance[name], signed[name] = None, None, np.zeros(0)
            continue
        if features.ndim != 2 or features.shape[1] != x.shape[1]:
            raise ValueError(
                f"{fn}: set {name!r} must hold features (m, {x.shape[1]}); got {features.shape}."
            )
        d = sign * svm.decision_function(features) / w_norm
        m = float(np.mean(np.abs(d)))
        accuracy[name] = float(np.mean(svm.predict(features) == np.asarray(labels)))
        distance[name] = m / (1 + m)
        signed[name] = d
    return Linearity(accuracy, distance, signed, converged)


# ------------------------------------------------------------------ baselines


class SegmentEnds(NamedTuple):
    """The two ends of segments to search: ``a`` of the source class, ``b`` of the target.

    Attributes:
      a: (n, H, W, C) source-class images.
      b: (n, H, W, C) target-class images.
      first, second: (n,) their indices in the images they were drawn from.
    """

    a: np.ndarray
    b: np.ndarray
    first: np.ndarray
    second: np.ndarray


def _check_class(value: Any, num_classes: int, fn: str, what: str) -> int:
    """One class index in ``[0, num_classes)``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{fn}: a {what} class must be an integer class index; got {value!r}.")
    if not 0 <= int(value) < num_classes:
        raise ValueError(
            f"{fn}: {what} class {int(value)} is out of range for a classifier with "
            f"{num_classes} classes; use class indices in [0, {num_classes})."
        )
    return int(value)


def check_class_pairs(pairs: Any, num_classes: int, fn: str) -> tuple[tuple[int, int], ...]:
    """``pairs`` as ``((s, t), ...)`` of two different class indices in ``[0, num_classes)``."""
    out = []
    for pair in pairs:
        try:
            s, t = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"{fn}: a class pair is two class indices (source, target), e.g. (3, 8); got "
                f"{pair!r}."
            ) from None
        s = _check_class(s, num_classes, fn, "source")
        t = _check_class(t, num_classes, fn, "target")
        if s == t:
            raise ValueError(f"{fn}: class pair ({s}, {t}) needs two different classes.")
        out.append((s, t))
    if not out:
        raise ValueError(f"{fn}: give at least one class pair (source, target).")
    return tuple(out)


def _correct(y: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
    """Indices of the images of class ``c`` that the model classifies ``c``."""
    return np.flatnonzero((y == c) & (labels == c))


def _labelled(apply_fn, params, x, y, labels, source, target, fn, map_fn):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4 or y.shape != x.shape[:1]:
        raise ValueError(f"{fn}: x must be (N, H, W, C) with one label per image in y.")
    num_classes = _checks.check_logits(apply_fn, params, jnp.asarray(x[0]), fn)
    check_class_pairs([(source, target)], num_classes, fn)
    labels = predict(apply_fn, params, x, map_fn=map_fn) if labels is None else labels
    return x, y, np.asarray(labels)


def random_pairs(
    key: jax.Array,
    apply_fn: Callable,
    params: Any,
    x: Any,
    y: Any,
    source: int,
    target: int,
    *,
    labels: Any = None,
    map_fn: Callable | None = None,
) -> SegmentEnds:
    """RPBS: correctly classified source and target images, shuffled and paired at random.

    Both sets are shuffled and cut to the shorter one (the reference's pairing).

    Args:
      key: PRNG key of the shuffles.
      apply_fn, params: the model.
      x, y: images (N, H, W, C) and their true labels.
      source, target: the class pair.
      labels: the model's predictions on ``x`` if already known.
      map_fn: batches the predictions, as in ``borderline_searches``.

    Returns:
      ``SegmentEnds``.
    """
    x, y, labels = _labelled(apply_fn, params, x, y, labels, source, target, "random_pairs", map_fn)
    rng = _rng(key)
    s, t = (
        rng.permutation(_correct(y, labels, source)),
        rng.permutation(_correct(y, labels, target)),
    )
    n = min(len(s), len(t))
    return SegmentEnds(x[s[:n]], x[t[:n]], s[:n], t[:n])


def embedding_nearest_pairs(
    apply_fn: Callable,
    features_fn: Callable,
    params: Any,
    x: Any,
    y: Any,
    source: int,
    target: int,
    *,
    labels: Any = None,
    map_fn: Callable | None = None,
) -> SegmentEnds:
    """EPBS: each correctly classified source image with its nearest target image (embedding).

    Nearest in the L2 distance between penultimate-layer features
    (``features_fn``), among the correctly classified target images. (The
    reference code takes a norm without an axis, which pairs every source
    image with the first target image; this is the pairing its paper states.)

    Args:
      apply_fn, features_fn, params: the model and its penultimate layer.
      x, y, source, target, labels, map_fn: as in ``random_pairs``.

    Returns:
      ``SegmentEnds``.
    """
    fn = "embedding_nearest_pairs"
    x, y, labels = _labelled(apply_fn, params, x, y, labels, source, target, fn, map_fn)
    s, t = _correct(y, labels, source), _correct(y, labels, target)
    if not len(s) or not len(t):
        return SegmentEnds(x[:0], x[:0], s[:0], t[:0])
    fs = features(features_fn, params, x[s], map_fn=map_fn)
    ft = features(features_fn, params, x[t], map_fn=map_fn)
    squared = (fs**2).sum(1)[:, None] + (ft**2).sum(1)[None] - 2 * fs @ ft.T
    nearest = t[np.argmin(squared, axis=1)]
    return SegmentEnds(x[s], x[nearest], s, nearest)


@dataclasses.dataclass(frozen=True)
class _Features:
    features_fn: Callable

    def __call__(self, params: Any, x: jax.Array) -> jax.Array:
        return self.features_fn(params, x).reshape(-1)


def features(features_fn: Callable, params: Any, x: Any, *, map_fn: Callable | None = None):
    """Penultimate features ``features_fn(params, x)`` of a batch, flattened: (N, D) float64."""
    x = np.asarray(x)
    if len(x) == 0:
        return np.zeros((0, 0))
    return np.asarray(_chunked(map_fn, _Features(features_fn), params, [x]), np.float64)


# ------------------------------------------------------------------ generators


class DenseGenerator(nnx.Module):
    """The fully connected autoencoder of DeepDIG's MNIST experiments.

    ``d -> hidden[0] -> ... -> d`` (reference: 784-100-50-784), ReLU between
    layers, a sigmoid on the output so images stay in [0, 1].
    """

    def __init__(self, shape: Sequence[int], hidden: Sequence[int] = (100, 50), *, rngs: nnx.Rngs):
        sizes = [math.prod(shape), *hidden]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.out = nnx.Linear(sizes[-1], sizes[0], rngs=rngs)

    def logits(self, x: jax.Array) -> jax.Array:
        """The output before the sigmoid, for a batch (N, H, W, C)."""
        h = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            h = jax.nn.relu(layer(h))
        return self.out(h).reshape(x.shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.logits(x))


class ConvGenerator(nnx.Module):
    """A convolutional autoencoder for larger images (DeepDIG's CIFAR-10 one, with stride 2).

    4x4 convolutions with stride 2 and ReLU down to ``hidden[-1]`` channels,
    the same number of 4x4 transposed convolutions back up, a sigmoid on the
    output; sizes that are not a multiple of ``2 ** len(hidden)`` are cropped
    back to the input's.
    """

    def __init__(
        self, shape: Sequence[int], hidden: Sequence[int] = (12, 24, 48), *, rngs: nnx.Rngs
    ):
        channels = [int(shape[-1]), *hidden]
        pairs = list(zip(channels[:-1], channels[1:], strict=True))
        conv = functools.partial(nnx.Conv, kernel_size=(4, 4), strides=(2, 2), padding="SAME")
        deconv = functools.partial(
            nnx.ConvTranspose, kernel_size=(4, 4), strides=(2, 2), padding="SAME"
        )
        self.encoder = nnx.List([conv(a, b, rngs=rngs) for a, b in pairs])
        self.decoder = nnx.List([deconv(b, a, rngs=rngs) for a, b in reversed(pairs)])

    def logits(self, x: jax.Array) -> jax.Array:
        """The output before the sigmoid, for a batch (N, H, W, C)."""
        h = x
        for layer in self.encoder:
            h = jax.nn.relu(layer(h))
        for i, layer in enumerate(self.decoder):
            h = layer(h)
            if i < len(self.decoder) - 1:
                h = jax.nn.relu(h)
        return h[:, : x.shape[1], : x.shape[2], :]

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.logits(x))


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """How DeepDIG's generators are built and trained (defaults: the reference code's).

    Attributes:
      steps: optimiser steps (reference: 5000).
      batch_size: images per pair and step (reference: 128); a set smaller
        than a batch is repeated.
      learning_rate: Adam's initial learning rate (reference: 0.01).
      decay_every, decay_rate: step decay, the rate multiplied by
        ``decay_rate`` every ``decay_every`` steps (reference: 0.95 every 1000).
      alpha: weight of the target term of the loss (reference: 0.8).
      architecture: ``"dense"``, ``"conv"`` or ``"auto"`` (dense for inputs of
        at most 1024 values, conv above).
      hidden: layer widths (dense) or channels (conv); ``None``: (100, 50) or
        (12, 24, 48).
      seed: initialisation seed of the first pair's generator (pair i: seed + i)
        and of the batch order.
    """

    steps: int = 5000
    batch_size: int = 128
    learning_rate: float = 0.01
    decay_every: int = 1000
    decay_rate: float = 0.95
    alpha: float = 0.8
    architecture: str = "auto"
    hidden: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        fn = "GeneratorConfig"
        for name in ("steps", "batch_size", "decay_every"):
            _checks.check_positive_int(getattr(self, name), name, fn)
        if not self.learning_rate > 0 or not 0 < self.decay_rate <= 1 or not self.alpha >= 0:
            raise ValueError(
                f"{fn}: learning_rate must be > 0, decay_rate in (0, 1] and alpha >= 0; got "
                f"{self.learning_rate}, {self.decay_rate}, {self.alpha}."
            )
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"{fn}: architecture must be one of {ARCHITECTURES}; got {self.architecture!r}."
            )
        if self.hidden is not None and (
            not len(self.hidden) or any(int(h) < 1 for h in self.hidden)
        ):
            raise ValueError(f"{fn}: hidden must be a non-empty list of sizes >= 1, or None.")


def resolve_architecture(architecture: str, shape: Sequence[int]) -> str:
    """``dense`` or ``conv`` for ``architecture`` (``auto``: dense up to 1024 input values)."""
    if architecture == "auto":
        return "dense" if math.prod(shape) <= DENSE_MAX_DIM else "conv"
    return architecture


def make_generator(config: GeneratorConfig, shape: Sequence[int], seed: Any) -> nnx.Module:
    """One untrained generator for images of ``shape`` (H, W, C), initialised from ``seed``."""
    arch = resolve_architecture(config.architecture, shape)
    hidden = tuple(config.hidden) if config.hidden is not None else DEFAULT_HIDDEN[arch]
    cls = DenseGenerator if arch == "dense" else ConvGenerator
    return cls(tuple(shape), hidden, rngs=nnx.Rngs(seed))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _initial_parameters(config: GeneratorConfig, shape: tuple[int, ...], seeds: jax.Array):
    """The parameters of ``make_generator(config, shape, s)`` for every seed, stacked: one
    compiled initialisation instead of one eager compilation per layer shape."""
    init = lambda s: nnx.split(make_generator(config, shape, jax.random.key(s)))[1]
    return jax.vmap(init)(seeds)


@dataclasses.dataclass
class Generators:
    """Trained generators, one per pair, stacked.

    Attributes:
      apply_fn: ``apply_fn(params, x)``: the generated image of ONE image (values
        in [0, 1]); ``params`` one generator's (``member(i)``).
      params: every generator's parameters, stacked along a leading pair axis.
      targets: (P,) the class each generator was trained to reach.
      architecture: ``"dense"`` or ``"conv"``.
      history: per-epoch arrays (epochs,): ``loss`` (the mean over pairs of
        reconstruction + alpha x target term), ``reconstruction``, ``attack``
        (the target term) and ``target_rate`` (fraction of generated images
        classified as their target), each a mean over the epoch's steps.
      steps: optimiser steps taken.
    """

    apply_fn: ApplyFn
    params: Any
    targets: np.ndarray
    architecture: str
    history: dict[str, np.ndarray]
    steps: int

    def member(self, i: int) -> Any:
        """The parameters of generator ``i``."""
        return unstack(self.params, i)

    def generate(self, sets: Sequence[Any]) -> list[np.ndarray]:
        """Generator ``i`` applied to every image of ``sets[i]`` (one jitted call for all)."""
        sets = [np.asarray(s, np.float32) for s in sets]
        if len(sets) != len(self.targets):
            raise ValueError(f"generate: give one image set per generator ({len(self.targets)}).")
        stacked, counts = _pad_sets(sets)
        out = np.asarray(_generate_stack(self.apply_fn.graphdef, self.params, stacked))
        return [o[:n] for o, n in zip(out, counts, strict=True)]


def _pad_sets(sets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sets of different sizes as one (P, max size, ...) array (zero padding) and their sizes."""
    counts = np.array([len(s) for s in sets])
    n = max(int(counts.max()), 1)
    shape = sets[0].shape[1:]
    return (
        np.stack([np.concatenate([s, np.zeros((n - len(s), *shape), s.dtype)]) for s in sets]),
        counts,
    )


@functools.partial(jax.jit, static_argnums=0)
def _generate_stack(graphdef: Any, params: Any, x: jax.Array) -> jax.Array:
    return jax.vmap(lambda p, xb: nnx.merge(graphdef, p)(xb))(params, x)


def _log_probability_terms(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log p`` and ``log(1 - p)`` of ``softmax(logits)``, clamped at -100 as torch's BCELoss."""
    logp = jax.nn.log_softmax(logits)
    q = -jnp.expm1(logp)  # 1 - p, accurate near p = 1
    safe = jnp.where(q > 0, q, 1.0)
    log1mp = jnp.where(q > 0, jnp.maximum(jnp.log(safe), -100.0), -100.0)
    return jnp.maximum(logp, -100.0), log1mp


def generator_loss(graphdef: Any, apply_fn: Callable, alpha: float) -> train.LossFn:
    """DeepDIG's generator loss for ``bgeom.train.train_loop``, every pair at once.

    ``BCE(G(x), x) + alpha * BCE(softmax f(G(x)), onehot t)`` per pair (both
    means over their elements, as torch's ``BCELoss``), averaged over pairs.
    The loss's ``params`` are the stacked generator parameters (P, ...); its
    ``state`` holds the frozen classifier (``classifier``), every pair's
    images (``images``, (P, N, H, W, C)) and targets (``targets``, (P,)); its
    ``batch`` holds the rows of each pair's images to use (``row``, (B, P)).
    """

    def loss_fn(gparams, state, batch, key):
        images, targets = state["images"], state["targets"]
        x = jax.vmap(lambda imgs, rows: imgs[rows], in_axes=(0, 1))(images, batch["row"])
        z = jax.vmap(lambda p, xb: nnx.merge(graphdef, p).logits(xb))(gparams, x)
        pairs, size = x.shape[:2]
        reconstruction = optax.sigmoid_binary_cross_entropy(z, x).reshape(pairs, -1).mean(1)
        generated = jax.nn.sigmoid(z).reshape(pairs * size, *x.shape[2:])
        logits = jax.vmap(apply_fn, in_axes=(None, 0))(state["classifier"], generated)
        logits = logits.reshape(pairs, size, -1)
        onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)[:, None]
        logp, log1mp = _log_probability_terms(logits)
        attack = -(onehot * logp + (1 - onehot) * log1mp).reshape(pairs, -1).mean(1)
        hits = jnp.argmax(logits, -1) == targets[:, None]
        metrics = {
            "reconstruction": jnp.mean(reconstruction),
            "attack": jnp.mean(attack),
            "target_rate": jnp.mean(hits),
        }
        return jnp.mean(reconstruction + alpha * attack), train.LossAux(state, metrics)

    return loss_fn


def _epochs(steps: int) -> int:
    """Checkpoint granularity: the largest divisor of ``steps`` that is at most 10."""
    return max(e for e in range(1, 11) if steps % e == 0)


def fingerprint(*arrays: Any) -> str:
    """A short hash of arrays and pytrees (their shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(arrays):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def train_generators(
    apply_fn: Callable,
    params: Any,
    images: Sequence[Any],
    targets: Sequence[int],
    *,
    config: GeneratorConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    desc: str = "deepdig generators",
) -> Generators:
    """Train one DeepDIG generator per image set, every one towards its target class.

    Generator ``i`` learns to reconstruct ``images[i]`` while the frozen
    classifier labels its outputs ``targets[i]``. All generators train
    together through ``bgeom.train.train_loop`` (Adam with step decay) as one
    stacked set of parameters: their losses are averaged, and since Adam
    updates every parameter from its own gradient alone, each trains as it
    would on its own. With ``checkpoint_dir``, orbax checkpoints (about ten per
    run) go there and a finished run is loaded instead of retrained.

    Args:
      apply_fn, params: the classifier (frozen; ``params`` is traced state).
      images: one set (n_i, H, W, C) of images in [0, 1] per generator.
      targets: one target class per generator.
      config: a ``GeneratorConfig`` (default: the reference's settings).
      checkpoint_dir: where the run is checkpointed (a folder of another run
        is refused: name folders after what they hold).
      progress: show a progress bar.
      desc: its label.

    Returns:
      ``Generators``.

    References:
      Karimi, Tang, Derr, 2019, https://arxiv.org/abs/1912.11460 ;
      docs/borderline.md, docs/training.md.
    """
    fn = "train_generators"
    config = config or GeneratorConfig()
    sets = [np.asarray(s, np.float32) for s in images]
    if not sets or len(sets) != len(targets):
        raise ValueError(
            f"{fn}: give one image set per target ({len(sets)} sets, {len(targets)} targets)."
        )
    shape = sets[0].shape[1:]
    for s in sets:
        if s.ndim != 4 or s.shape[1:] != shape or not len(s):
            raise ValueError(
                f"{fn}: every image set must be a non-empty batch (n, H, W, C) of one image shape; "
                f"got shapes {[x.shape for x in sets]}."
            )
    num_classes = _checks.check_logits(apply_fn, params, jnp.asarray(sets[0][0]), fn)
    targets = np.array([_check_class(t, num_classes, fn, "target") for t in targets], np.int32)
    graphdef = nnx.split(nnx.eval_shape(lambda: make_generator(config, shape, 0)))[0]
    gparams = _initial_parameters(config, shape, config.seed + jnp.arange(len(sets)))
    stacked, counts = _pad_sets(sets)
    epochs = _epochs(config.steps)
    per_epoch = config.steps // epochs
    rows = (np.arange(per_epoch * config.batch_size)[:, None] % counts[None, :]).astype(np.int32)
    schedule = optax.exponential_decay(
        config.learning_rate, config.decay_every, config.decay_rate, staircase=True
    )
    tx = optax.adam(schedule)
    state = {"classifier": params, "images": stacked, "targets": targets}
    init = train.init_train_state(train.stack([gparams]), train.stack([state]), tx)
    # Committed to one device like the step's outputs, so the step compiles once
    # (uncommitted inputs, e.g. restored checkpoints, would make the second step compile again).
    init = jax.device_put(init, jax.devices()[0])
    record = {
        "what": "DeepDIG generators",
        "config": dataclasses.asdict(config),
        "architecture": resolve_architecture(config.architecture, shape),
        "targets": targets.tolist(),
        "sizes": counts.tolist(),
        "inputs": fingerprint(stacked, params),
    }
    done = train.train_loop(
        generator_loss(graphdef, apply_fn, config.alpha),
        tx,
        init,
        {"row": rows},
        seeds=[config.seed],
        epochs=epochs,
        batch_size=config.batch_size,
        checkpoint_dir=checkpoint_dir,
        record=json.loads(json.dumps(record, default=list)),
        progress=progress,
        desc=desc,
    )
    return Generators(
        apply_fn=ApplyFn(graphdef, "__call__"),
        params=unstack(done.train.params, 0),
        targets=targets,
        architecture=record["architecture"],
        history={k: np.asarray(v)[:, 0] for k, v in done.history.items()},
        steps=int(done.step),
    )


# ------------------------------------------------------------------ the three phases


class DeepDIGPair(NamedTuple):
    """DeepDIG's three phases for one directed class pair ``source -> target``.

    Attributes:
      source, target: the pair: phase I pushes source images into the target class.
      phase1_train_yield: fraction of the source-class training images ``x`` with
        ``f(x) = source`` and ``f(G1(x)) = target`` (``None`` without images).
      phase1_test_yield: the same on the test images (held out from ``G1``).
      phase2_train_yield: fraction of ``G2``'s own training set ``A`` (``G1`` of
        the training images) with ``f(G2(a)) = source``, the figure the
        reference code reports.
      phase2_yield: the same on held-out adversarial images (``G1`` of the test
        images), which ``G2`` never saw: the pairs searched come from these.
      adversarial: (n, H, W, C) the held-out adversarial images ``a`` kept
        (classified ``target``).
      reflected: (n, H, W, C) their images ``G2(a)`` (classified ``source``).
      search: ``BorderlineResult`` (NumPy, leading axis n) of the bisections of
        ``[a, G2(a)]``: its ``source`` is the label of ``a`` (this pair's
        target) and its ``target`` the label of ``G2(a)``.
    """

    source: int
    target: int
    phase1_train_yield: float | None
    phase1_test_yield: float | None
    phase2_train_yield: float | None
    phase2_yield: float | None
    adversarial: np.ndarray
    reflected: np.ndarray
    search: BorderlineResult

    @property
    def instances(self) -> np.ndarray:
        """The borderline instances: the converged search points, (m, H, W, C)."""
        return self.search.point[self.search.converged]


class DeepDIGResult(NamedTuple):
    """Every directed pair's ``DeepDIGPair`` and the generators of both phases.

    Attributes:
      pairs: one ``DeepDIGPair`` per directed pair, in the order given.
      phase1: the phase I generators (one per pair, target: the pair's target).
      phase2: the phase II generators of the pairs whose phase I kept a
        training image (target: the pair's source), or ``None`` if none did.
      phase2_pairs: the indices into ``pairs`` that ``phase2``'s generators
        belong to.
    """

    pairs: tuple[DeepDIGPair, ...]
    phase1: Generators
    phase2: Generators | None
    phase2_pairs: tuple[int, ...]


def _fraction(mask: np.ndarray) -> float | None:
    return float(np.mean(mask)) if mask.size else None


def _labels_of(apply_fn, params, sets: Sequence[np.ndarray], map_fn) -> list[np.ndarray]:
    """The model's labels of every image of every set, in one mapped call."""
    joined = np.concatenate(sets)
    return split_rows(predict(apply_fn, params, joined, map_fn=map_fn), [len(s) for s in sets])


def _run_dir(root: Path | None, name: str, *things: Any) -> Path | None:
    """``root / <name>-<hash of what the run depends on>``: a new folder for a new run."""
    if root is None:
        return None
    return root / f"{name}-{fingerprint(*things)}"


def deepdig(
    apply_fn: Callable,
    params: Any,
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    pairs: Sequence[tuple[int, int]],
    *,
    config: GeneratorConfig | None = None,
    tol: float = 1e-4,
    max_halvings: int = 60,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    map_fn: Callable | None = None,
) -> DeepDIGResult:
    """DeepDIG's borderline instances for directed class pairs ``(source, target)``.

    Phase I trains one generator per pair on the source-class training images
    towards the target (``train_generators``, all pairs at once); its outputs
    classified ``target`` from images classified ``source`` are the
    adversarial sets, from the training images (to train phase II) and from
    the test images (held out). Phase II trains one generator per pair on its
    training adversarial set towards the source and applies it to the
    held-out set; the pairs ``(a, G2(a))`` it maps back into the source class
    are bisected by ``borderline_search`` (phase III, all pairs in one
    compiled map). Classes are the model's predictions; the image sets are
    selected by the true labels, as in the reference.

    Args:
      apply_fn, params: the classifier.
      x_train, y_train: training images (N, H, W, C) in [0, 1] and labels.
      x_test, y_test: held-out images and labels.
      pairs: directed class pairs ``(source, target)``; give both ``(s, t)``
        and ``(t, s)`` for both directions.
      config: the generators' ``GeneratorConfig`` (both phases).
      tol, max_halvings: the bisection's, as in ``borderline_search``.
      checkpoint_dir: a folder for the generators' checkpoints: each phase
        goes to ``<folder>/phase1-<hash>`` / ``phase2-<hash>``, the hash of
        everything it depends on, so a re-run reuses finished generators and
        a changed setting trains new ones.
      progress: show progress bars while training.
      map_fn: batches the per-example work, as in ``borderline_searches``.

    Returns:
      ``DeepDIGResult``.

    Raises:
      ValueError: a class pair out of range or of one class, no training image
        of a source class, bad arrays or settings.

    References:
      Karimi, Tang, Derr, 2019, https://arxiv.org/abs/1912.11460 ;
      docs/borderline.md.
    """
    fn = "deepdig"
    config = config or GeneratorConfig()
    x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 4 or y.shape != x.shape[:1]:
            raise ValueError(
                f"{fn}: x_{name} must be a batch (N, H, W, C) with one label per image in "
                f"y_{name}; got {x.shape} and {y.shape}."
            )
    num_classes = _checks.check_logits(apply_fn, params, jnp.asarray(x_train[0]), fn)
    pairs = check_class_pairs(pairs, num_classes, fn)
    _check_tol(tol, fn)
    max_halvings = _checks.check_positive_int(max_halvings, "max_halvings", fn, minimum=1)
    for s, _ in pairs:
        if not np.any(y_train == s):
            raise ValueError(f"{fn}: there is no training image of class {s} to train phase I on.")
    root = Path(checkpoint_dir) if checkpoint_dir is not None else None

    # Phase I: source images -> target.
    sources = [x_train[y_train == s] for s, _ in pairs]
    held = [x_test[y_test == s] for s, _ in pairs]
    g1 = train_generators(
        apply_fn,
        params,
        sources,
        [t for _, t in pairs],
        config=config,
        checkpoint_dir=_run_dir(root, "phase1", sources, params, dataclasses.asdict(config)),
        progress=progress,
        desc="deepdig phase I",
    )
    made, made_held = g1.generate(sources), g1.generate(held)
    labels = _labels_of(apply_fn, params, [*sources, *held, *made, *made_held], map_fn)
    p = len(pairs)
    adv, adv_held, yields = [], [], []
    for i, (s, t) in enumerate(pairs):
        keep = (labels[i] == s) & (labels[2 * p + i] == t)
        keep_held = (labels[p + i] == s) & (labels[3 * p + i] == t)
        adv.append(made[i][keep])
        adv_held.append(made_held[i][keep_held])
        yields.append((_fraction(keep), _fraction(keep_held)))

    # Phase II: adversarial images -> back to the source, evaluated on held-out ones.
    active = tuple(i for i in range(p) if len(adv[i]))
    g2, back, back_held = None, {}, {}
    if active:
        train_sets = [adv[i] for i in active]
        g2 = train_generators(
            apply_fn,
            params,
            train_sets,
            [pairs[i][0] for i in active],
            config=config,
            checkpoint_dir=_run_dir(root, "phase2", train_sets, params, dataclasses.asdict(config)),
            progress=progress,
            desc="deepdig phase II",
        )
        made = g2.generate(train_sets) + g2.generate([adv_held[i] for i in active])
        labels = _labels_of(apply_fn, params, made, map_fn)
        for j, i in enumerate(active):
            back[i] = (made[j], labels[j])
            back_held[i] = (made[len(active) + j], labels[len(active) + j])

    # Phase III: bisect every kept (a, G2(a)), all pairs in one call.
    ends, second_yields = [], []
    for i, (s, _) in enumerate(pairs):
        if i not in back:
            ends.append((adv_held[i][:0], adv_held[i][:0]))
            second_yields.append((None, None))
            continue
        keep = back_held[i][1] == s
        ends.append((adv_held[i][keep], back_held[i][0][keep]))
        second_yields.append((_fraction(back[i][1] == s), _fraction(keep)))
    found = borderline_searches(
        apply_fn,
        params,
        np.concatenate([a for a, _ in ends]),
        np.concatenate([b for _, b in ends]),
        tol=tol,
        max_halvings=max_halvings,
        map_fn=map_fn,
    )
    searches = split_results(found, [len(a) for a, _ in ends])
    results = tuple(
        DeepDIGPair(s, t, *yields[i], *second_yields[i], ends[i][0], ends[i][1], searches[i])
        for i, (s, t) in enumerate(pairs)
    )
    return DeepDIGResult(results, g1, g2, active)
