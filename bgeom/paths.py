"""Connectivity of classification regions: paths between two points that stay in one class.

After Fawzi, Moosavi-Dezfooli, Frossard and Soatto (docs/connectivity.md). Two
points x1, x2 of class i are joined by a polyline x1 -> anchors -> x2. A
segment [a, b] is accepted when densely sampled points on it all have class
i; otherwise its midpoint m becomes an anchor, pushed back into region i by a
targeted DeepFool search (``bgeom.boundary``) when k(m) != i, and both halves are examined in turn.

Implementation choice: a fixed-shape ``lax.while_loop``, not a host-side
recursion, so that everything composes with ``jax.jit`` and ``jax.vmap``. The
recursion becomes a linked list in fixed arrays: node 0 is x1, node 1 is x2,
anchor k is node k + 1; ``next[s]`` is the node after ``s`` on the path, and a
segment is named by its first node. Segments are examined breadth-first (the
shallowest pending one, then the lowest node); a segment that leaves the
region and may be split writes its pushed midpoint into the next free node
and both halves become pending. The search is bounded by ``max_anchors`` (the
array size) and ``max_depth`` (the recursion depth) and needs at most
``2 * max_anchors + 1`` segment tests. At the end the list is walked into path
order (padding: repeated copies of x2) and every segment of the final path is
re-sampled on an independent grid of ``verify_samples`` (>= 100) points;
``converged`` (alias ``connected``) is True only if all of them keep the class.

``find_paths`` runs the same search for N pairs from one pool of pending
segments (``batch`` per step). Under ``jax.vmap(find_path)`` every pair runs
as many steps as the hardest pair of the batch; the pool lets a pair that
needs one test finish without waiting for one that needs sixty
(``benchmarks/bench_paths.py`` measures the difference).

Pair generators (``pair_indices``, ``make_pairs``) build the three kinds of
pairs of the paper: two natural images of a class; a natural image and an
image of another class pushed into that class (targeted DeepFool); two such
adversarial images.
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
from bgeom.margins import targeted_deepfool

# ``PathResult.status`` codes (index into STATUS_NAMES).
FOUND = 0  # every segment accepted and verified: ``connected``
MAX_ANCHORS = 1  # a segment left the region but all anchor slots were used
MAX_DEPTH = 2  # a segment left the region at the maximum recursion depth
PUSH_FAILED = 3  # targeted DeepFool could not push a midpoint back into the class
LABEL_MISMATCH = 4  # x1 and x2 are not classified alike (only under jit/vmap; eager raises)
VERIFY_FAILED = 5  # the search accepted every segment but the dense re-sampling did not
NONFINITE = 6  # NaN/Inf logits at an endpoint (only under jit/vmap; eager raises)
STATUS_NAMES = (
    "found",
    "max_anchors",
    "max_depth",
    "push_failed",
    "label_mismatch",
    "verify_failed",
    "nonfinite",
)

PAIR_KINDS = ("natural", "natural-adversarial", "adversarial")

# Anchors go this many minimal pushes deep into the class region (see find_path).
DEFAULT_PUSH_DEPTH = 3.0


class PathResult(NamedTuple):
    """A path between two points of one class, verified by dense re-sampling.

    ``P = max_anchors + 2`` fixes every shape, so results of many pairs stack
    under ``jax.vmap``.

    Attributes:
      points: (P, H, W, C): x1, the anchors in path order, x2, then copies of x2
        as padding (zero-length segments), so the polyline through all P
        points is the path.
      num_points: number of distinct path points, ``num_anchors + 2``.
      num_anchors: number of anchors (0: the straight segment was accepted).
      converged: True iff the search succeeded AND every segment of ``points``
        keeps class ``label`` at all ``verify_samples`` re-sampled points: the
        two points are connected (also readable as ``connected``).
      label: the class i of x1 (the model's prediction).
      status: why the search ended, an index into ``STATUS_NAMES``
        (0 ``found`` iff ``converged``).
      segment_ok: (P - 1,) verification of each segment (padding: True).
      straight_ok: whether the straight segment x1 -> x2 keeps the class at
        the ``verify_samples`` points (False: it leaves the region).
      length: Euclidean length of the path.
      distance: ``||x2 - x1||``.
      length_ratio: ``length / distance`` (>= 1; 1 for the straight segment
        and when x1 == x2).
      segments_tested: number of segment tests the search ran.
      segments_crossing: how many of those left the region (were split or
        ended the search).
    """

    points: jax.Array
    num_points: jax.Array
    num_anchors: jax.Array
    converged: jax.Array
    label: jax.Array
    status: jax.Array
    segment_ok: jax.Array
    straight_ok: jax.Array
    length: jax.Array
    distance: jax.Array
    length_ratio: jax.Array
    segments_tested: jax.Array
    segments_crossing: jax.Array

    @property
    def connected(self) -> jax.Array:
        """``converged``: a path was found and verified (the paper's word)."""
        return self.converged


def _segment_keeps(f: Callable, a: jax.Array, b: jax.Array, ts: jax.Array, label: jax.Array):
    """Whether ``(1 - t) a + t b`` has class ``label`` (and finite logits) for every t."""
    t = ts.reshape((-1,) + (1,) * a.ndim)
    # (1 - t) a + t b hits both endpoints exactly, unlike a + t (b - a).
    logits = jax.vmap(f)((1 - t) * a[None] + t * b[None])
    return jnp.all(jnp.argmax(logits, axis=-1) == label) & jnp.all(jnp.isfinite(logits))


class _Pool(NamedTuple):
    """The search state of N pairs: a linked list of path nodes per pair.

    Node 0 is x1, node 1 is x2, anchor k is node k + 1; a segment is named by
    its first node and ends at ``next`` of it.
    """

    points: jax.Array  # (N, P, H, W, C) node positions
    next: jax.Array  # (N, P) the node after each node on the path
    depth: jax.Array  # (N, P) recursion depth of the segment starting at each node
    pending: jax.Array  # (N, P) segments waiting for a test
    used: jax.Array  # (N,) nodes in use
    tested: jax.Array  # (N,) segment tests run
    crossing: jax.Array  # (N,) tests that found the segment leaving the region
    status: jax.Array  # (N,) STATUS_NAMES code (FOUND while searching)


class _Taken(NamedTuple):
    """The ``batch`` segments tested in one step (some entries may be void)."""

    valid: jax.Array  # a real pending segment
    pair: jax.Array
    start: jax.Array  # first node
    end: jax.Array  # next node
    depth: jax.Array


def _init_pool(f: Callable, x1: jax.Array, x2: jax.Array, size: int) -> tuple[_Pool, jax.Array]:
    """Every pair's straight segment pending (unless its endpoints disagree); the labels."""
    num = x1.shape[0]
    logits1, logits2 = jnp.split(jax.vmap(f)(jnp.concatenate([x1, x2])), 2)
    label = jnp.argmax(logits1, axis=-1).astype(jnp.int32)
    finite = jnp.all(jnp.isfinite(logits1), -1) & jnp.all(jnp.isfinite(logits2), -1)
    same = jnp.argmax(logits2, axis=-1) == label
    status = jnp.where(finite, jnp.where(same, FOUND, LABEL_MISMATCH), NONFINITE)
    zeros = jnp.zeros(num, jnp.int32)
    pool = _Pool(
        points=jnp.zeros((num, size) + x1.shape[1:], x1.dtype).at[:, 0].set(x1).at[:, 1].set(x2),
        next=jnp.ones((num, size), jnp.int32),  # node 1 (x2) ends each path
        depth=jnp.zeros((num, size), jnp.int32),
        pending=jnp.zeros((num, size), bool).at[:, 0].set(status == FOUND),
        used=jnp.full(num, 2, jnp.int32),
        tested=zeros,
        crossing=zeros,
        status=status.astype(jnp.int32),
    )
    return pool, label


def _take(pool: _Pool, max_depth: jax.Array, batch: int) -> _Taken:
    """The ``batch`` shallowest pending segments over all pairs.

    A pair contributes only segments of its shallowest pending level, so its
    segments are taken in exactly the order of a one-by-one breadth-first
    search (then by pair, then by node).
    """
    num, size = pool.next.shape
    order_key = (
        jnp.arange(num, dtype=jnp.int32)[:, None] * size + jnp.arange(size, dtype=jnp.int32)[None]
    )
    idle = jnp.iinfo(jnp.int32).max  # key of segments that are not ready
    level = jnp.min(jnp.where(pool.pending, pool.depth, max_depth + 1), axis=1, keepdims=True)
    ready = pool.pending & (pool.depth == level)
    key = jnp.where(ready, pool.depth * (num * size) + order_key, idle).ravel()
    neg_key, sel = jax.lax.top_k(-key, batch)
    p, s = sel // size, sel % size
    return _Taken(-neg_key < idle, p, s, pool.next[p, s], pool.depth[p, s])


def _search_step(
    f: Callable,
    push: Callable,
    pool: _Pool,
    label: jax.Array,
    ts: jax.Array,
    max_depth: jax.Array,
    batch: int,
) -> _Pool:
    """Test ``batch`` segments; split those that leave the region at pushed midpoints."""
    size = pool.next.shape[1]
    t = _take(pool, max_depth, batch)
    p, s, e, d, lab = t.pair, t.start, t.end, t.depth, label[t.pair]
    a, b = pool.points[p, s], pool.points[p, e]
    ok = jax.vmap(lambda a, b, lab: _segment_keeps(f, a, b, ts, lab))(a, b, lab)
    # Entries of one pair are in that pair's sequential order; a segment that
    # leaves the region takes the next free node, as in a one-by-one search.
    earlier = jnp.arange(batch)[:, None] > jnp.arange(batch)[None, :]  # [j, i]: i before j
    same_pair = p[:, None] == p[None, :]
    cand = t.valid & ~ok
    rank = jnp.sum(earlier & same_pair & cand[None, :], axis=1)
    room, shallow = pool.used[p] + rank < size, d < max_depth
    attempt = cand & room & shallow
    # Entries that need no push start at an endpoint of class lab: zero steps.
    # When no entry needs one (most steps), lax.cond skips the pushes.
    expand = lambda v: v.reshape((-1,) + (1,) * (a.ndim - 1))
    start = jnp.where(expand(attempt), 0.5 * (a + b), a)
    # An anchor may go at most half the segment's length into the class.
    reach = 0.5 * jnp.sqrt(jnp.sum(jnp.square((b - a).reshape(batch, -1)), axis=1))
    anchor, pushed = jax.lax.cond(
        jnp.any(attempt), push, lambda z, *_: (z, jnp.zeros(batch, bool)), start, lab, reach
    )
    fail = cand & ~(room & shallow & pushed)
    code = jnp.where(~room, MAX_ANCHORS, jnp.where(~shallow, MAX_DEPTH, PUSH_FAILED))
    # A pair's search ends at its first failure: later entries of it are void.
    applied = t.valid & ~jnp.any(earlier & same_pair & fail[None, :], axis=1)
    insert = applied & attempt & pushed
    slot = jnp.where(insert, pool.used[p] + rank, size)  # size: out of range, write dropped
    split = jnp.where(insert, s, size)
    pending = pool.pending.at[p, jnp.where(t.valid, s, size)].set(insert, mode="drop")
    status = pool.status.at[jnp.where(applied & fail, p, label.shape[0])].set(code, mode="drop")
    return _Pool(
        points=pool.points.at[p, slot].set(anchor, mode="drop"),
        next=pool.next.at[p, slot].set(e, mode="drop").at[p, split].set(slot, mode="drop"),
        depth=pool.depth.at[p, slot].set(d + 1, mode="drop").at[p, split].set(d + 1, mode="drop"),
        pending=pending.at[p, slot].set(True, mode="drop") & (status == FOUND)[:, None],
        used=pool.used.at[p].add(insert.astype(jnp.int32)),
        tested=pool.tested.at[p].add(applied.astype(jnp.int32)),
        crossing=pool.crossing.at[p].add((applied & ~ok).astype(jnp.int32)),
        status=status,
    )


def _push_depths(depth: float) -> tuple[float, ...]:
    """Multiples of the minimal push tried for an anchor, deepest first, ending at 1."""
    if depth <= 1.0:
        return (1.0,)
    return (depth, 1.0 + (depth - 1.0) / 2, 1.0 + (depth - 1.0) / 4, 1.0)


def _deepest(
    f: Callable,
    z: jax.Array,
    p: jax.Array,
    label: jax.Array,
    reach: jax.Array,
    depths: tuple[float, ...],
) -> jax.Array:
    """``z + k p`` for the largest ``k`` in ``depths`` still in class ``label``, within ``reach``.

    ``p`` is the minimal push of ``z`` into ``label`` (``k = 1``, the last of
    ``depths``, always qualifies: the search checked it). Anchors pushed just
    across the region's edge make the chords beside them cut the same corner
    again; deeper anchors need fewer of them.
    """
    if len(depths) == 1:
        return z + p
    k = jnp.asarray(depths, z.dtype)
    expand = (slice(None),) + (None,) * z.ndim
    tried = z[None] + k[expand] * p[None]  # (K, batch, ...)
    labels = jnp.argmax(jax.vmap(jax.vmap(f))(tried), axis=-1)
    length = jnp.sqrt(jnp.sum(jnp.square(p.reshape(len(p), -1)), axis=1))
    fits = (labels == label[None]) & (k[:, None] * length[None] <= jnp.maximum(reach, length))
    fits = fits.at[-1].set(True)
    first = jnp.argmax(fits, axis=0)  # the deepest that fits
    return tried[first, jnp.arange(len(p))]


def _path_order(points: jax.Array, nxt: jax.Array) -> jax.Array:
    """Each pair's nodes in path order: follow ``next`` from x1, then stay at x2 (padding)."""
    size = nxt.shape[1]

    def walk(links):
        def step(node, _):
            return jnp.where(node == 1, 1, links[node]), node

        return jax.lax.scan(step, jnp.asarray(0, jnp.int32), None, length=size)[1]

    order = jax.vmap(walk)(nxt)
    return jax.vmap(lambda nodes, o: nodes[o])(points, order)


def _verify(
    f: Callable,
    points: jax.Array,
    used: jax.Array,
    x1: jax.Array,
    x2: jax.Array,
    label: jax.Array,
    verify_samples: int,
    batch: int,
) -> tuple[jax.Array, jax.Array]:
    """Dense re-sampling of every segment of every path and of every straight segment.

    Pooled ``batch`` segments at a time, so only real segments are evaluated.
    Returns ``(segment_ok (N, P - 1), straight_ok (N,))``.
    """
    num, size = points.shape[:2]
    expand = lambda v: v.reshape((-1,) + (1,) * (x1.ndim - 1))
    vts = jnp.linspace(0.0, 1.0, verify_samples, dtype=x1.dtype)
    vkeeps = jax.vmap(lambda a, b, lab: _segment_keeps(f, a, b, vts, lab))
    num_seg = num * (size - 1)
    # A straight segment that is the whole path is verified once, as the path.
    live = jnp.concatenate([(jnp.arange(size - 1)[None] < (used - 1)[:, None]).ravel(), used > 2])
    queue = jnp.concatenate([jnp.argsort(~live, stable=True), jnp.full(batch, live.size)])
    count = jnp.sum(live)

    def step(state):
        c, seg_ok = state
        q = jax.lax.dynamic_slice(queue, (c * batch,), (batch,))
        is_seg = q < num_seg
        ps, j = jnp.clip(q // (size - 1), 0, num - 1), q % (size - 1)
        pl = jnp.clip(q - num_seg, 0, num - 1)
        a = jnp.where(expand(is_seg), points[ps, j], x1[pl])
        b = jnp.where(expand(is_seg), points[ps, j + 1], x2[pl])
        okv = vkeeps(a, b, jnp.where(is_seg, label[ps], label[pl]))
        done = c * batch + jnp.arange(batch) < count
        return c + 1, seg_ok.at[jnp.where(done, q, live.size)].set(okv, mode="drop")

    _, seg_ok = jax.lax.while_loop(
        lambda state: state[0] * batch < count, step, (jnp.asarray(0), jnp.ones(live.size, bool))
    )
    segment_ok = seg_ok[:num_seg].reshape(num, size - 1)
    return segment_ok, jnp.where(used > 2, seg_ok[num_seg:], segment_ok[:, 0])


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "max_anchors", "samples", "verify_samples", "batch", "push_depth"),
)
def _find_paths_core(
    apply_fn: Callable,
    params: Any,
    x1: jax.Array,
    x2: jax.Array,
    push: boundary.DeepFoolOptions,
    max_depth: jax.Array,
    *,
    max_anchors: int,
    samples: int,
    verify_samples: int,
    batch: int,
    push_depth: float,
) -> PathResult:
    """The search for N pairs at once (leading axis of x1, x2) from one segment pool.

    ``max_depth`` and ``push.overshoot`` are traced (changing them does not
    recompile); ``max_anchors`` sets the shapes.
    """
    f = lambda z: apply_fn(params, z)
    num, size = x1.shape[0], max_anchors + 2
    batch = min(batch, num * size)
    ts = jnp.linspace(0.0, 1.0, samples, dtype=x1.dtype)

    def pushed_points(z, lab, reach):
        res = jax.vmap(lambda m, t: boundary.targeted_search(apply_fn, params, m, t, push))(z, lab)
        anchor = _deepest(f, z, res.perturbation, lab, reach, _push_depths(push_depth))
        return anchor, res.reached & res.finite

    pool, label = _init_pool(f, x1, x2, size)
    pool = jax.lax.while_loop(
        lambda pool: jnp.any(pool.pending),
        lambda pool: _search_step(f, pushed_points, pool, label, ts, max_depth, batch),
        pool,
    )
    points = _path_order(pool.points, pool.next)
    segment_ok, straight_ok = _verify(f, points, pool.used, x1, x2, label, verify_samples, batch)
    all_ok = jnp.all(segment_ok, axis=1)
    status = jnp.where((pool.status == FOUND) & ~all_ok, VERIFY_FAILED, pool.status)
    diffs = jnp.diff(points, axis=1).reshape(num, size - 1, -1)
    length = jnp.sum(jnp.sqrt(jnp.sum(jnp.square(diffs), -1)), -1)
    distance = jnp.sqrt(jnp.sum(jnp.square((x2 - x1).reshape(num, -1)), -1))
    ratio = jnp.where(distance > 0, length / jnp.where(distance > 0, distance, 1.0), 1.0)
    return PathResult(
        points=points,
        num_points=pool.used,
        num_anchors=pool.used - 2,
        converged=(status == FOUND) & all_ok,
        label=label,
        status=status.astype(jnp.int32),
        segment_ok=segment_ok,
        straight_ok=straight_ok,
        length=length,
        distance=distance,
        length_ratio=ratio,
        segments_tested=pool.tested,
        segments_crossing=pool.crossing,
    )


@functools.partial(jax.jit, static_argnums=0)
def _logits(apply_fn: Callable, params: Any, x: jax.Array) -> jax.Array:
    return jax.vmap(apply_fn, in_axes=(None, 0))(params, x)


def _prepare(
    name: str,
    apply_fn: Callable,
    params: Any,
    x1: Any,
    x2: Any,
    options: dict[str, Any],
    batched: bool,
) -> tuple[jax.Array, jax.Array, boundary.DeepFoolOptions, dict[str, Any]]:
    """Validate the arguments of find_path / find_paths; return (x1, x2, push, core options)."""
    x1, x2 = jnp.asarray(x1), jnp.asarray(x2)
    if x1.shape != x2.shape:
        what = "batches of the same shape (N, H, W, C)" if batched else "the same shape"
        raise ValueError(
            f"{name}: x1 and x2 must have {what}; got {tuple(x1.shape)} and "
            f"{tuple(x2.shape)}. Pass two images of the same dataset."
        )
    if batched:
        if x1.ndim != 4 or x1.shape[0] < 1:
            raise ValueError(
                f"{name} expects batches of pairs x1, x2 of shape (N, H, W, C); got "
                f"{tuple(x1.shape)}. For one pair use bgeom.find_path."
            )
        first = x1[0]
    else:
        first = x1
    _, push = _push_options(options["push"]).checked(name, apply_fn, params, first)
    for x in (x1, x2):
        if batched:
            _checks.check_example(x[0], name)  # one example's rank and dtype
            if _checks.is_concrete(x) and not bool(np.all(np.isfinite(np.asarray(x)))):
                raise ValueError(
                    f"{name} got an input with NaN or Inf values; clean the input first "
                    "(e.g. jnp.nan_to_num) or check the data pipeline."
                )
        else:
            _checks.check_example(x, name)
    dtype = jnp.result_type(x1, x2)
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    core = {
        "max_anchors": _checks.check_positive_int(
            options["max_anchors"], "max_anchors", name, minimum=0
        ),
        "max_depth": _checks.check_positive_int(options["max_depth"], "max_depth", name, minimum=0),
        "samples": _checks.check_positive_int(options["samples"], "samples", name, minimum=3),
        "verify_samples": _checks.check_positive_int(
            options["verify_samples"], "verify_samples", name, minimum=100
        ),
        "push_depth": _checks.check_nonnegative_float(options["push_depth"], "push_depth", name),
    }
    if core["push_depth"] < 1:
        raise ValueError(
            f"{name}: push_depth must be >= 1 (1: the minimal push onto the region's edge); "
            f"got {core['push_depth']}."
        )
    if all(_checks.is_concrete(a) for a in jax.tree.leaves((params, x1, x2))):
        _check_same_class(name, apply_fn, params, x1, x2, batched)
    return x1, x2, push, core


def _check_same_class(
    name: str, apply_fn: Callable, params: Any, x1: jax.Array, x2: jax.Array, batched: bool
) -> None:
    """Raise when x1 and x2 (concrete) are classified differently or give NaN logits."""
    xs1, xs2 = (x if batched else x[None] for x in (x1, x2))
    l1, l2 = (
        np.asarray(_logits(apply_fn, params, xs1)),
        np.asarray(_logits(apply_fn, params, xs2)),
    )
    if not (np.all(np.isfinite(l1)) and np.all(np.isfinite(l2))):
        raise ValueError(
            f"{name}: the model returns NaN or Inf logits at x1 or x2; check the "
            "model and the inputs."
        )
    k1, k2 = l1.argmax(-1), l2.argmax(-1)
    bad = np.flatnonzero(k1 != k2)
    if bad.size:
        i = int(bad[0])
        where = f" (pair {i}; {bad.size} of {len(k1)} pairs differ)" if batched else ""
        raise ValueError(
            f"{name}: x1 is classified as {k1[i]} but x2 as {k2[i]}{where}; a path "
            "inside one class region needs two points of the same class. Pick x2 "
            f"of class {k1[i]}, or move it there first with "
            f"bgeom.targeted_deepfool(apply_fn, params, x2, {k1[i]})."
        )


def _push_options(push: boundary.DeepFoolOptions | None) -> boundary.DeepFoolOptions:
    """The targeted DeepFool settings of anchor pushes (candidates do not apply)."""
    return dataclasses.replace(boundary.options_or_default(push, "push"), candidates=2)


def find_path(
    apply_fn: Callable,
    params: Any,
    x1: jax.Array,
    x2: jax.Array,
    *,
    max_anchors: int = 31,
    max_depth: int = 10,
    samples: int = 100,
    verify_samples: int = 128,
    push: boundary.DeepFoolOptions | None = None,
    push_depth: float = DEFAULT_PUSH_DEPTH,
) -> PathResult:
    """A path from x1 to x2 that never leaves their class region (if one is found).

    The recursion of docs/connectivity.md: the segment [a, b] is accepted when
    ``samples`` equally spaced points on it (ends included) all have the class
    i = k(x1); otherwise its midpoint m, pushed into region i when k(m) != i
    (``push_depth`` times the minimal targeted DeepFool push, so the anchor
    lies well inside the region), becomes an anchor and [a, m], [m, b] are
    examined (breadth-first). The search stops unsuccessfully when a
    segment that leaves the region cannot be split: all ``max_anchors`` used,
    depth ``max_depth`` reached, or the push failed. The returned path is then
    verified on an independent grid of ``verify_samples`` points per segment.

    A fixed-shape ``lax`` loop: composes with ``jax.jit`` and ``jax.vmap`` (over
    pairs, and over ``params`` for ensembles). Under ``vmap`` every pair runs
    as many segment tests as the hardest one; ``find_paths`` runs many pairs
    from one pool of segments instead and is much faster when they differ.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters (any pytree); traced.
      x1, x2: two examples of the same shape (H, W, C) that the model puts in
        the same class.
      max_anchors: most anchors a path may have (sets the shape of ``points``).
      max_depth: most recursive halvings of a segment (0: only the straight
        segment can be accepted).
      samples: points tested per segment during the search (>= 3).
      verify_samples: points per segment of the final check (>= 100).
      push: the settings of the targeted DeepFool pushes of anchors
        (``bgeom.DeepFoolOptions``: ``overshoot``, ``max_iter``, ``bounds``;
        ``candidates`` does not apply).
      push_depth: how deep an anchor goes into the region, in multiples of
        the minimal push ``p`` (default 3): the deepest of ``3p, 2p, 1.5p, p``
        (for the default) that the model still puts in class i and that is no
        longer than half the segment. Anchors pushed just across the region's
        edge (``push_depth=1``) make the chords beside them cut the same
        corner again, and paths around a hole then need many anchors.

    Returns:
      ``PathResult``; ``connected`` is the verified answer and ``status`` says
      why a search failed. Failures are results, not exceptions.

    Raises:
      ValueError: on misuse found at trace time: x1 and x2 of different
        shapes, or (with concrete inputs) classified differently.

    References:
      Method page: docs/connectivity.md.
      Fawzi, Moosavi-Dezfooli, Frossard, Soatto. "Classification regions of
      deep neural networks", 2017 (CVPR 2018 as "Empirical study of the
      topology and geometry of deep networks"). https://arxiv.org/abs/1705.09552
    """
    options = dict(
        max_anchors=max_anchors,
        max_depth=max_depth,
        samples=samples,
        verify_samples=verify_samples,
        push=push,
        push_depth=push_depth,
    )
    x1, x2, push, core = _prepare("find_path", apply_fn, params, x1, x2, options, batched=False)
    depth = jnp.asarray(core.pop("max_depth"), jnp.int32)
    res = _find_paths_core(apply_fn, params, x1[None], x2[None], push, depth, batch=1, **core)
    return jax.tree.map(lambda a: a[0], res)


def find_paths(
    apply_fn: Callable,
    params: Any,
    x1: jax.Array,
    x2: jax.Array,
    *,
    batch: int = 16,
    max_anchors: int = 31,
    max_depth: int = 10,
    samples: int = 100,
    verify_samples: int = 128,
    push: boundary.DeepFoolOptions | None = None,
    push_depth: float = DEFAULT_PUSH_DEPTH,
) -> PathResult:
    """``find_path`` for N pairs at once, from one pool of pending segments.

    Same algorithm, options and results as ``jax.vmap(find_path)``: each
    pair's segments are examined in the same order, so the results agree up to
    the floating-point rounding of batched model evaluations (which can, rarely,
    decide a sample lying on a boundary differently and change the rest of
    that pair's search). But each step
    tests the ``batch`` shallowest pending segments of ALL pairs together, so
    a pair that needs one test does not wait through the hundred tests of
    another, as it does under ``vmap``. The dense verification is pooled the
    same way. Pure and fixed-shape: works under ``jax.jit`` (and ``vmap`` over
    ``params``).

    Args:
      apply_fn, params: the model, as in ``find_path``.
      x1, x2: (N, H, W, C) batches of pairs; pair k is ``(x1[k], x2[k])``.
      batch: segments tested per step (each costs ``samples`` forward passes).
      max_anchors, max_depth, samples, verify_samples, push, push_depth: as in
        ``find_path``.

    Returns:
      ``PathResult`` with a leading axis of length N on every field.

    References:
      Method page: docs/connectivity.md.
      Fawzi, Moosavi-Dezfooli, Frossard, Soatto. "Classification regions of
      deep neural networks", 2017. https://arxiv.org/abs/1705.09552
    """
    options = dict(
        max_anchors=max_anchors,
        max_depth=max_depth,
        samples=samples,
        verify_samples=verify_samples,
        push=push,
        push_depth=push_depth,
    )
    x1, x2, push, core = _prepare("find_paths", apply_fn, params, x1, x2, options, batched=True)
    batch = _checks.check_positive_int(batch, "batch", "find_paths")
    depth = jnp.asarray(core.pop("max_depth"), jnp.int32)
    return _find_paths_core(apply_fn, params, x1, x2, push, depth, batch=batch, **core)


# ------------------------------------------------------------------ pairs


class PairIndices(NamedTuple):
    """Which images make each pair (NumPy int arrays of length ``num_pairs``).

    Attributes:
      first, second: indices of the source images of x1 and x2.
      target: the class both endpoints must have. A source whose label is not
        ``target`` is pushed there by ``make_pairs``.
    """

    first: np.ndarray
    second: np.ndarray
    target: np.ndarray


class Pairs(NamedTuple):
    """Pairs of points of one class, ready for ``find_paths`` (or ``vmap(find_path)``).

    Attributes:
      x1, x2: (N, H, W, C) endpoints (adversarial ones already pushed).
      label: (N,) the class both endpoints should have.
      kind: (N,) index into ``PAIR_KINDS`` of each pair's kind.
      first, second: (N,) indices of the source images.
      valid: (N,) True where both endpoints have class ``label``: natural ones
        by their labels, pushed ones when targeted DeepFool converged and the
        stored point is classified ``label``. Run the path search on these.
    """

    x1: np.ndarray
    x2: np.ndarray
    label: np.ndarray
    kind: np.ndarray
    first: np.ndarray
    second: np.ndarray
    valid: np.ndarray


def _rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key: host-side sampling, explicit key."""
    return np.random.default_rng(np.asarray(jax.random.bits(key, (4,), jnp.uint32)))


def _other(rng: np.random.Generator, members: np.ndarray, exclude: int) -> int:
    """A uniform element of ``members`` other than ``exclude``."""
    rest = members[members != exclude]
    return int(rest[rng.integers(len(rest))])


def pair_indices(key: jax.Array, labels: Any, num_pairs: int, kind: str) -> PairIndices:
    """Draw ``num_pairs`` pairs of image indices of one of the three kinds.

    - ``"natural"``: two different images with the same label; target = that label.
    - ``"natural-adversarial"``: an image of class i and an image of another
      class (to be pushed into i); target = i.
    - ``"adversarial"``: two different images, neither of class i (both to be
      pushed into i); i is the label of a uniformly drawn image, so classes
      come with their frequency in ``labels``.

    Pairs are drawn independently (a pair may repeat when ``labels`` is small).

    Args:
      key: a JAX PRNG key.
      labels: (N,) integer labels, normally the model's predictions: class
        regions are the model's, not the ground truth's.
      num_pairs: number of pairs (>= 1).
      kind: one of ``PAIR_KINDS``.

    Returns:
      ``PairIndices`` of NumPy arrays.
    """
    name = "pair_indices"
    if kind not in PAIR_KINDS:
        raise ValueError(f"{name}: unknown pair kind {kind!r}; choose one of {PAIR_KINDS}.")
    num_pairs = _checks.check_positive_int(num_pairs, "num_pairs", name)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"{name}: labels must be a 1-D array of class indices >= 0.")
    rng = _rng(key)
    counts = np.bincount(labels)
    n = len(labels)
    if kind == "natural":
        eligible = np.flatnonzero(counts[labels] >= 2)
        need = "two images with the same label"
    elif kind == "natural-adversarial":
        eligible = np.flatnonzero(counts[labels] < n)
        need = "two different labels"
    else:
        eligible = np.flatnonzero(n - counts[labels] >= 2)
        need = "two images outside some class"
    if not eligible.size:
        raise ValueError(f"{name}: {kind!r} pairs need {need}; labels has none.")
    anchor = rng.choice(eligible, num_pairs)
    target = labels[anchor]
    first = np.empty(num_pairs, np.int64)
    second = np.empty(num_pairs, np.int64)
    for p, (a, t) in enumerate(zip(anchor, target, strict=True)):
        if kind == "natural":
            first[p], second[p] = a, _other(rng, np.flatnonzero(labels == t), a)
        elif kind == "natural-adversarial":
            others = np.flatnonzero(labels != t)
            first[p], second[p] = a, others[rng.integers(len(others))]
        else:
            others = np.flatnonzero(labels != t)
            first[p] = others[rng.integers(len(others))]
            second[p] = _other(rng, others, first[p])
    return PairIndices(first, second, target.astype(np.int32))


def _vmap_all(fn: Callable, *args: Any, in_axes: Any) -> Any:
    return jax.jit(jax.vmap(fn, in_axes=in_axes))(*args)


def _label_fn(apply_fn: Callable) -> Callable:
    """``(params, x) -> k(x)``, the predicted class of one example."""
    return lambda p, x: jnp.argmax(apply_fn(p, x)).astype(jnp.int32)


def _push_into(
    name: str,
    apply_fn: Callable,
    params: Any,
    images: np.ndarray,
    targets: np.ndarray,
    push: boundary.DeepFoolOptions | None,
    map_fn: Callable,
) -> tuple[np.ndarray, np.ndarray]:
    """``images`` moved into ``targets`` by targeted DeepFool, and which arrived there.

    The pushes run through ``bgeom.engine`` (top-level steps, compaction).
    """
    push = _push_options(push)
    pushed = engine.batched(targeted_deepfool)(
        apply_fn,
        params,
        images,
        targets,
        overshoot=push.overshoot,
        max_iter=push.max_iter,
        bounds=push.bounds,
    )
    moved = images + np.asarray(pushed.perturbation)
    # Re-check the stored points: x + r is rounded once more than x + (1 + o) r.
    moved_labels = np.asarray(map_fn(_label_fn(apply_fn), params, moved, in_axes=(None, 0)))
    return moved, np.asarray(pushed.converged) & (moved_labels == targets)


def make_pairs(
    key: jax.Array,
    apply_fn: Callable,
    params: Any,
    images: Any,
    num_pairs: int,
    kinds: str | tuple[str, ...] = PAIR_KINDS,
    *,
    labels: Any = None,
    push: boundary.DeepFoolOptions | None = None,
    map_fn: Callable | None = None,
) -> Pairs:
    """``num_pairs`` pairs of points of one class for each kind in ``kinds``.

    Kinds are those of ``pair_indices`` (``PAIR_KINDS``). Images of another
    class are moved into the target class with ``targeted_deepfool`` (the
    paper's "adversarial images now labelled i"), all kinds in one batched
    call; ``valid`` is False where that did not work. Kind ``k`` draws its
    pairs with ``jax.random.fold_in(key, k)``, so they do not depend on which
    other kinds are asked for.

    Args:
      key: a JAX PRNG key.
      apply_fn, params: the model, as everywhere in bgeom.
      images: (N, H, W, C) natural images to draw from.
      num_pairs: pairs per kind.
      kinds: one kind or a sequence of kinds.
      labels: the model's predictions on ``images`` if already known
        (computed otherwise).
      push: the settings of the targeted DeepFool pushes, as in ``find_path``.
      map_fn: ``map_fn(fn, *args, in_axes=...)`` batches the label
        predictions (default: one ``jax.jit(jax.vmap(fn))`` call over
        everything; the suite passes its chunked, sharded ``ctx.map``). The
        pushes run through ``bgeom.batched(targeted_deepfool)``.

    Returns:
      ``Pairs`` of NumPy arrays, kinds one after the other.
    """
    name = "make_pairs"
    map_fn = map_fn or _vmap_all
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    for kind in kinds:
        if kind not in PAIR_KINDS:
            raise ValueError(f"{name}: unknown pair kind {kind!r}; choose from {PAIR_KINDS}.")
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{name}: images must be a batch (N, H, W, C); got {images.shape}.")
    if labels is None:
        labels = map_fn(_label_fn(apply_fn), params, images, in_axes=(None, 0))
    labels = np.asarray(labels)
    if labels.shape != images.shape[:1]:
        raise ValueError(
            f"{name}: labels must have one entry per image; got shape {labels.shape} "
            f"for {images.shape[0]} images."
        )
    parts = [
        (
            PAIR_KINDS.index(k),
            pair_indices(jax.random.fold_in(key, PAIR_KINDS.index(k)), labels, num_pairs, k),
        )
        for k in kinds
    ]
    kind = np.concatenate([np.full(num_pairs, k, np.int32) for k, _ in parts])
    first = np.concatenate([idx.first for _, idx in parts])
    second = np.concatenate([idx.second for _, idx in parts])
    target = np.concatenate([idx.target for _, idx in parts])
    x1, x2 = images[first].copy(), images[second].copy()
    # Endpoints whose source is of another class are pushed into the target.
    push1, push2 = labels[first] != target, labels[second] != target
    sources = np.r_[first[push1], second[push2]]
    targets = np.r_[target[push1], target[push2]]
    ok1, ok2 = np.ones(len(kind), bool), np.ones(len(kind), bool)
    if sources.size:
        moved, ok = _push_into(name, apply_fn, params, images[sources], targets, push, map_fn)
        m = int(push1.sum())
        x1[push1], ok1[push1] = moved[:m], ok[:m]
        x2[push2], ok2[push2] = moved[m:], ok[m:]
    return Pairs(x1, x2, target, kind, first, second, ok1 & ok2)
