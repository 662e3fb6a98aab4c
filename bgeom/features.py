"""Feature-space geometry: convex hulls, class polyhedra and morphing in the last hidden layer.

After Yousefzadeh (2022), see docs/features.md. In the last hidden layer a
classifier is affine: logits ``W f + b`` of the features ``f = phi(x)`` (>= 0
after a ReLU). The region of class i there is the polyhedron
``{f : (w_i - w_j)^T f + b_i - b_j >= 0 for all j}``; it is convex, so it
holds the convex hull of the training features of class i exactly when all of
them are classified i.

- ``hull_distance``: the distance from a query to the convex hull of n points,
  with the convex weights and a certificate (``gap``): the true distance lies
  in ``[distance - gap, distance]``. Wolfe's minimum-norm-point algorithm
  (an active-set method: the answer lives on at most d + 1 points) run on a
  small working set of candidates, which full passes over the points refresh
  (column generation); the points' Gram matrix is never formed.
- ``hull_membership``: exact inside / outside decisions (a separating
  hyperplane, barycentric coordinates in float64, or a HiGHS LP).
- ``last_layer``, ``class_polyhedron``, ``class_facets``, ``containment``,
  ``closest_boundary_point``: the class polyhedra of the last layer.
- ``reach_features``: an image whose features reach a target feature vector.
- ``morph``: the features of a pixel-space interpolation against the straight
  path in feature space: where each leaves the hull or crosses the boundary.
- ``outside_fractions``: test points outside the training hull, per class and
  overall.

Every jittable function works on ONE query (or example) and composes with
``jax.jit`` and ``jax.vmap``; ``hull_distance`` also takes a batch of queries
and maps over it in chunks itself. ``hull_membership``, ``class_facets`` and
``outside_fractions`` run LPs on the host (scipy HiGHS) and return NumPy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bgeom import _checks

# ``status`` codes of every result of this module (index into STATUS_NAMES).
CONVERGED = 0
MAX_ROUNDS = 1  # hull_distance: the budget of full passes over the points ran out
STALLED = 2  # hull_distance: no point could be added (float precision), gap above tolerance
SUPPORT_FULL = 3  # hull_distance: the answer needs more than max_support points
NONFINITE = 4  # NaN/Inf in the points, the query, the features or the logits
EMPTY = 5  # hull_distance: the mask selects no point
NOT_REACHED = 6  # reach_features: the feature error stayed above tol
NO_BOUNDARY = 7  # closest_boundary_point: no facet hyperplane meets the feature domain
STATUS_NAMES = (
    "converged",
    "max_rounds",
    "stalled",
    "support_full",
    "nonfinite",
    "empty",
    "not_reached",
    "no_boundary",
)

# How hull_membership decided (index into MEMBERSHIP_METHODS).
MEMBERSHIP_METHODS = ("separated", "combination", "lp")


# --------------------------------------------------------------------------- results


class HullResult(NamedTuple):
    """The distance from a query q to the convex hull of a set of points.

    ``m = max_support`` fixes every shape, so results of many queries stack.

    Attributes:
      distance: ``||x - q||`` for the hull point ``x = sum_k weights[k]
        points[support[k]]`` found: an upper bound of the true distance (``inf``
        for an empty set, NaN for non-finite input).
      weights: (m,) convex weights (>= 0, summing to 1) on ``support``; 0 on
        unused slots.
      support: (m,) int32 indices into ``points`` (0 on unused slots).
      gap: the certificate: the true distance lies in ``[distance - gap,
        distance]``. It is ``distance - max(0, min_i (p_i - q)^T u)`` with
        ``u = (x - q) / ||x - q||``: the separating hyperplane normal to ``u``
        bounds the distance from below (the duality gap of the problem).
      converged: ``gap <= rtol * distance + atol * radius``, checked on a full
        pass over the points (``radius``: the largest distance of a point from
        the centroid of all points).
      status: why the solver stopped, an index into ``STATUS_NAMES``
        (``converged``, ``max_rounds``, ``stalled``, ``support_full``,
        ``nonfinite``, ``empty``); 0 iff ``converged``.
      iterations: Wolfe steps (points added or dropped) over all rounds.
      passes: full passes over the points (one per round, plus the first).
    """

    distance: jax.Array
    weights: jax.Array
    support: jax.Array
    gap: jax.Array
    converged: jax.Array
    status: jax.Array
    iterations: jax.Array
    passes: jax.Array

    @property
    def lower(self) -> jax.Array:
        """The certified lower bound ``distance - gap`` of the distance (>= 0)."""
        return jnp.maximum(self.distance - self.gap, 0.0)

    def nearest(self, points: Any) -> jax.Array:
        """The hull point found, ``sum_k weights[k] points[support[k]]`` (batched results too)."""
        points = jnp.asarray(points)
        return jnp.einsum("...k,...kd->...d", self.weights, points[self.support])

    def dense_weights(self, n: int) -> jax.Array:
        """The weights as a dense (..., n) vector over all points."""

        def one(w, s):
            return jnp.zeros(n, w.dtype).at[s].add(w)

        for _ in range(self.weights.ndim - 1):
            one = jax.vmap(one)
        return one(self.weights, self.support)


class Membership(NamedTuple):
    """Exact inside / outside decisions of ``hull_membership`` (NumPy arrays, one per query).

    Attributes:
      inside: True when the query lies within ``tol`` of the (closed) convex hull.
      method: how it was decided, an index into ``MEMBERSHIP_METHODS``:
        ``separated`` (outside: every point lies beyond a hyperplane more than
        ``tol`` from it, checked in float64), ``combination`` (inside: a convex
        combination of the points lies within ``tol``, in float64), ``lp``
        (neither within a few rounds: the HiGHS LP on all points decided).
      distance: ``hull_distance``'s distance.
      lower: the certified lower bound of the distance (0 inside).
    """

    inside: np.ndarray
    method: np.ndarray
    distance: np.ndarray
    lower: np.ndarray


class Polyhedron(NamedTuple):
    """The region of class ``label`` in the last hidden layer: ``{f : A f + c >= 0}``.

    Attributes:
      normals: (L, d) rows ``A_j = w_label - w_j`` (row ``label`` is zero).
      offsets: (L,) ``c_j = b_label - b_j`` (0 at ``label``).
      mask: (L,) True for the L - 1 real constraints (``j != label``).
      label: the class.
    """

    normals: jax.Array
    offsets: jax.Array
    mask: jax.Array
    label: jax.Array

    def slack(self, f: Any) -> jax.Array:
        """``A f + c`` (``+inf`` at ``label``): all >= 0 iff f is in the region."""
        s = self.normals @ jnp.asarray(f) + self.offsets
        return jnp.where(self.mask, s, jnp.inf)


class Facets(NamedTuple):
    """Which constraints of a class polyhedron are facets (``class_facets``; NumPy).

    Attributes:
      is_facet: (L,) True for a non-redundant constraint ``j``: some point of
        the region (within the feature domain) has ``A_j f + c_j < 0`` when it
        is dropped, so it bounds the region along a (d-1)-dimensional face.
      min_slack: (L,) the LP minimum of ``A_j f + c_j`` over the region without
        constraint j (``-inf``: unbounded; NaN at ``label``).
      empty: True when the region (within the domain) is empty.
    """

    is_facet: np.ndarray
    min_slack: np.ndarray
    empty: bool


class Containment(NamedTuple):
    """Per class: does the convex hull of its training features lie in its region?

    Attributes:
      inside: (L,) True iff every training feature of class i is in the closed
        region of class i (then so is their hull, the region being convex);
        False for a class with no training point.
      accuracy: (L,) fraction of the training points of class i classified i.
      min_margin: (L,) the smallest ``logit_i - max_{j != i} logit_j`` over the
        training features of class i (< 0: some training point, a vertex of the
        hull, lies outside the region).
      count: (L,) training points of each class.
    """

    inside: jax.Array
    accuracy: jax.Array
    min_margin: jax.Array
    count: jax.Array


class FeatureBoundary(NamedTuple):
    """The closest point of the decision boundary to a feature vector.

    Attributes:
      point: (d,) the closest point of the boundary of the region of ``label``
        (within ``f >= 0`` when ``nonnegative``).
      distance: ``||point - f||`` (``inf`` when not converged).
      label: the class of ``f`` (argmax of ``W f + b``).
      adv_label: the class across the facet the point lies on.
      facet_distances: (L,) distance to each facet's hyperplane within the
        domain (``inf`` at ``label`` and where the hyperplane misses it).
      converged: a finite closest point exists.
      status: ``converged``, ``no_boundary`` or ``nonfinite``.
    """

    point: jax.Array
    distance: jax.Array
    label: jax.Array
    adv_label: jax.Array
    facet_distances: jax.Array
    converged: jax.Array
    status: jax.Array


class ReachResult(NamedTuple):
    """An image whose features reach a target feature vector (``reach_features``).

    Attributes:
      image: the best image found (in ``bounds``).
      features: its features.
      error: ``||features - target|| / ||target||`` (relative feature error).
      initial_error: the same for the starting image.
      distance: ``||image - x||``, how far the image moved.
      converged: ``error <= tol``.
      status: ``converged``, ``not_reached`` or ``nonfinite``.
    """

    image: jax.Array
    features: jax.Array
    error: jax.Array
    initial_error: jax.Array
    distance: jax.Array
    converged: jax.Array
    status: jax.Array


class MorphResult(NamedTuple):
    """Features along a pixel-space interpolation against the straight path in feature space.

    ``S = steps`` points at ``t = 0, 1/(S-1), ..., 1``.

    Attributes:
      t: (S,) the interpolation parameters.
      features: (S, d) ``phi((1 - t) x1 + t x2)``.
      straight: (S, d) ``(1 - t) phi(x1) + t phi(x2)``.
      deviation: (S,) ``||features - straight||``.
      labels: (S,) classes along the pixel path (``W features + b``).
      straight_labels: (S,) classes along the straight path.
      hull_distance: (S,) distance of ``features`` to the hull of ``points``.
      straight_hull_distance: (S,) the same for ``straight``.
      outside: (S,) ``features`` certified outside the hull (lower bound > the
        solver's tolerance ``atol * radius``).
      straight_outside: (S,) the same for ``straight``.
      crossing: first ``t`` of the grid where the pixel path's class differs
        from its class at t = 0 (``inf``: none).
      straight_crossing: the exact ``t`` where the straight path leaves the
        region of its class at t = 0 (``inf``: never; affine in t, so exact).
      exit: first ``t`` of the grid where ``features`` is outside the hull
        (``inf``: none).
      straight_exit: the same for ``straight``.
      converged: every hull distance converged and every value is finite.
    """

    t: jax.Array
    features: jax.Array
    straight: jax.Array
    deviation: jax.Array
    labels: jax.Array
    straight_labels: jax.Array
    hull_distance: jax.Array
    straight_hull_distance: jax.Array
    outside: jax.Array
    straight_outside: jax.Array
    crossing: jax.Array
    straight_crossing: jax.Array
    exit: jax.Array
    straight_exit: jax.Array
    converged: jax.Array


class OutsideFractions(NamedTuple):
    """Test points outside the convex hull of training points (``outside_fractions``; NumPy).

    Attributes:
      overall: fraction of test points outside the hull of all training points.
      per_class: (L,) fraction of the test points of class c outside the hull
        of the training points of class c (NaN for a class without test points).
      outside: (n_test,) each test point outside the hull of all training points.
      outside_class: (n_test,) each test point outside the hull of its class.
      distance: (n_test,) distance to the hull of all training points.
      class_distance: (n_test,) distance to the hull of its class.
      lp_calls: how many queries needed the LP.
    """

    overall: float
    per_class: np.ndarray
    outside: np.ndarray
    outside_class: np.ndarray
    distance: np.ndarray
    class_distance: np.ndarray
    lp_calls: int


# --------------------------------------------------------------------------- checks


def _check_points(points: Any, q: Any, mask: Any, fn_name: str) -> tuple[jax.Array, ...]:
    """Shapes, dtypes and (when concrete) finiteness of a hull problem."""
    points = jnp.asarray(points)
    q = jnp.asarray(q)
    if points.ndim != 2:
        raise ValueError(
            f"{fn_name}: points must be a 2-D array (n, d), one point per row; got shape "
            f"{tuple(points.shape)}. Flatten images with points.reshape(len(points), -1)."
        )
    n, d = points.shape
    if n == 0:
        raise ValueError(f"{fn_name}: the point set is empty; pass at least one point.")
    if d == 0:
        raise ValueError(f"{fn_name}: points have dimension 0; pass vectors of dimension >= 1.")
    if q.ndim not in (1, 2) or q.shape[-1] != d:
        raise ValueError(
            f"{fn_name}: q must be one query of shape ({d},) or a batch ({{Q}}, {d}) matching "
            f"the points' dimension {d}; got shape {tuple(q.shape)}. Flatten both the same way."
        )
    for name, a in (("points", points), ("q", q)):
        if not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)):
            raise ValueError(f"{fn_name}: {name} must be numeric; got dtype {a.dtype}.")
    dtype = jnp.result_type(points.dtype, q.dtype, jnp.float32)
    points, q = points.astype(dtype), q.astype(dtype)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(f"{fn_name}: mask must be boolean; got dtype {mask.dtype}.")
        ok = mask.shape == (n,) or (q.ndim == 2 and mask.shape == (q.shape[0], n))
        if not ok:
            raise ValueError(
                f"{fn_name}: mask must have shape ({n},) (one per point), or (Q, {n}) for a batch "
                f"of Q queries; got {tuple(mask.shape)}."
            )
        if _checks.is_concrete(mask) and not bool(np.all(np.any(np.asarray(mask), axis=-1))):
            raise ValueError(
                f"{fn_name}: the mask selects no point (an empty set); select at least one."
            )
    for name, a in (("points", points), ("q", q)):
        if _checks.is_concrete(a) and not bool(np.all(np.isfinite(np.asarray(a)))):
            raise ValueError(
                f"{fn_name}: {name} contain NaN or Inf; remove or repair those rows first "
                "(e.g. points[np.isfinite(points).all(1)])."
            )
    return points, q, mask


def _static_int(value: Any, name: str, fn_name: str, minimum: int = 1) -> int:
    return _checks.check_positive_int(value, name, fn_name, minimum)


# --------------------------------------------------------------------------- hull solver
#
# Wolfe's minimum-norm-point algorithm for one query, with fixed shapes. The
# corral (at most m = d + 1 affinely independent points) lives in m slots. The
# affine minimiser of ||x - q|| over the corral solves the bordered system
# [[G, 1], [1^T, 0]] [alpha; nu] = [Z (q - ref); 1], G = Z Z^T, Z the corral's
# points minus a reference point ``ref`` of the hull near the answer (which
# keeps G well-conditioned however far q is). Its inverse is kept up to date
# by rank-one updates when a point enters or leaves, and rebuilt at the start
# of every round. Candidates come from full passes over all points (one
# matrix-vector product per query; a matrix-matrix product across a batch of
# queries); Wolfe's linear minimisations inside a round look only at the k
# candidates of the round.
#
# Small products are written as ``_tmv(a, v) = a^T v`` (multiply, then sum
# over the leading axis): XLA:CPU compiles each small dot_general into a loop
# nest of its own, slowly, while these fuse and vectorise along the minor
# axis, also when batched. Hence the transposed copies below.


class _Corral(NamedTuple):
    idx: jax.Array  # (m,) point index of each slot
    active: jax.Array  # (m,) slot in use
    lam: jax.Array  # (m,) convex weights (0 on free slots)
    pts: jax.Array  # (m, d) the slots' (scaled) points
    minv: jax.Array  # (m + 1, m + 1) inverse bordered Gram matrix about ref (free slots: 1)
    rhs: jax.Array  # (m + 1,) right-hand side [Z (q - ref); 1] (0 on free slots)
    sol: jax.Array  # (m + 1,) minv @ rhs: the affine minimiser's weights, then nu
    ref: jax.Array  # (d,) reference point


class _Cands(NamedTuple):
    idx: jax.Array  # (k,) point index of each candidate
    pts_t: jax.Array  # (d, k) the candidates (scaled), transposed
    in_corral: jax.Array  # (k,) currently in a corral slot
    bad: jax.Array  # (k,) not to be added this round (masked out, or numerically dependent)


class _Inner(NamedTuple):
    corral: _Corral
    cands: _Cands
    steps: jax.Array  # Wolfe steps this round
    added: jax.Array  # points added this round
    done: jax.Array
    full: jax.Array  # a point was wanted but every slot was in use
    upper: jax.Array  # ||x - q|| of the current weights


class _Outer(NamedTuple):
    corral: _Corral
    cands: _Cands
    upper: jax.Array  # ||x - q|| (scaled units)
    gap: jax.Array  # upper minus the lower bound (scaled units)
    rounds: jax.Array
    steps: jax.Array
    status: jax.Array
    done: jax.Array


class _Problem(NamedTuple):
    """The scaled point set, shared by every query."""

    pts: jax.Array  # (n, d) (points - center) / radius
    sq: jax.Array  # (n,) squared norms of pts
    center: jax.Array
    radius: jax.Array


def _tmv(a: jax.Array, v: jax.Array) -> jax.Array:
    """``a^T v`` for a small matrix ``a`` (sum over its leading axis)."""
    return jnp.sum(a * v[:, None], axis=0)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(a * b)


def _z_mv(c: _Corral, af: jax.Array, y: jax.Array) -> jax.Array:
    """``Z y`` with Z the active points minus ref: (m,)."""
    return af * (c.pts @ y - _dot(c.ref, y))


def _z_tmv(c: _Corral, coef: jax.Array) -> jax.Array:
    """``Z^T coef`` (coef zero on free slots): (d,)."""
    return _tmv(c.pts, coef) - jnp.sum(coef) * c.ref


def _projection(c: _Corral, af: jax.Array, zj: jax.Array):
    """``minv @ b`` for the bordered column ``b`` of the point ``ref + zj``, and the
    squared distance of that point from the corral's affine hull (the Schur complement of
    adding it), computed as a residual norm: accurate where the Schur formula cancels."""
    m = af.shape[0]
    b = jnp.concatenate([_z_mv(c, af, zj), jnp.ones((1,), af.dtype)])
    u = _tmv(c.minv, b)  # minv is symmetric
    return u, jnp.sum((zj - _z_tmv(c, af * u[:m])) ** 2)


def _refine(c: _Corral, af: jax.Array, sol: jax.Array) -> jax.Array:
    """One step of iterative refinement of ``sol ~ M^{-1} rhs``."""
    m = af.shape[0]
    va, nu = af * sol[:m], sol[m]
    top = _z_mv(c, af, _z_tmv(c, va)) + af * nu + (1 - af) * sol[:m]
    residual = c.rhs - jnp.concatenate([top, jnp.sum(va)[None]])
    return sol + _tmv(c.minv, residual)


def _rank_one(minv, v, coef, added, add_slot, removed, remove_slot):
    """``minv + coef v v^T``, then the free-slot identity restored: at ``add_slot`` (which
    held one) or at ``remove_slot`` (whose row and column are cleared). One fused pass."""
    size = minv.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    out = minv + coef * v[:, None] * v[None, :]
    out = jnp.where(added & (row == add_slot) & (col == add_slot), out - 1, out)
    cleared = removed & ((row == remove_slot) | (col == remove_slot))
    return jnp.where(cleared, (row == col).astype(minv.dtype), out)


def _bordered(c: _Corral, af: jax.Array) -> jax.Array:
    """The bordered matrix ``[[G, 1], [1^T, 0]]`` of the corral about ``ref`` (free slots:
    identity), built explicitly."""
    z_t = ((c.pts - c.ref) * af[:, None]).T
    g = jnp.einsum("ki,kj->ij", z_t, z_t) + jnp.diag(1 - af)
    top = jnp.concatenate([g, af[:, None]], axis=1)
    return jnp.concatenate([top, jnp.concatenate([af, jnp.zeros((1,), af.dtype)])[None]], axis=0)


def _refresh(c: _Corral, qh: jax.Array) -> _Corral:
    """Move the reference point to the current hull point and clean up the drift of the
    rank-one updates; recompute the affine minimiser, refined once.

    Moving the reference by ``delta`` turns G into ``G + 1 w^T + w 1^T`` with
    ``w = -Z delta + |delta|^2 / 2``: a congruence of the bordered matrix by
    ``[[I, 0], [w^T, 1]]``, which leaves the inverse's weight block unchanged and
    changes only its border (O(m^2)). One Newton-Schulz step ``X (2 I - M X)``
    then removes the drift."""
    m = c.active.shape[0]
    dtype = c.pts.dtype
    af = c.active.astype(dtype)
    new_ref = _tmv(c.pts, c.lam)
    delta = new_ref - c.ref
    w = -_z_mv(c, af, delta) + af * _dot(delta, delta) / 2
    a11, a12, a22 = c.minv[:m, :m], c.minv[:m, m], c.minv[m, m]
    a11_w = _tmv(a11, w)
    border = a12 - a11_w
    corner = a22 - 2 * _dot(w, a12) + _dot(w, a11_w)
    minv = c.minv.at[:m, m].set(border).at[m, :m].set(border).at[m, m].set(corner)
    c = c._replace(ref=new_ref, minv=minv)
    resid = jnp.eye(m + 1, dtype=dtype) - _bordered(c, af) @ minv
    better = minv + minv @ resid
    # Newton-Schulz converges where the residual is below 1; a larger one means a
    # degenerate corral, left as it is (the certificate still says how good x is).
    minv = jnp.where(jnp.max(jnp.abs(resid)) < 0.5, (better + better.T) / 2, minv)
    rhs = jnp.concatenate([_z_mv(c, af, qh - new_ref), jnp.ones((1,), dtype)])
    c = c._replace(minv=minv, rhs=rhs)
    return c._replace(sol=_refine(c, af, _refine(c, af, _tmv(minv, rhs))))


def _pick(v: jax.Array, hot: jax.Array) -> jax.Array:
    """``v[i]`` for the one-hot mask ``hot`` of i (fuses, unlike a gather)."""
    return jnp.sum(jnp.where(hot, v, 0), axis=-1)


def _inner_step(st: _Inner, qh: jax.Array, rtol, atol, dep_tol) -> _Inner:
    """One Wolfe step on the working set: drop a point, add a candidate, or stop.

    Written branch-free with one-hot masks instead of scatters and gathers: under
    ``vmap`` both branches run anyway, and masks fuse (and compile) better."""
    c, cd = st.corral, st.cands
    m = c.active.shape[0]
    slots = jnp.arange(m)
    a = c.active
    af = a.astype(c.pts.dtype)
    sol = _refine(c, af, c.sol)  # against the drift of the rank-one updates
    alpha = sol[:m] * af  # the affine minimiser over the corral
    interior = jnp.all(jnp.where(a, alpha > 0, True))

    # Major step: accept alpha, look for the best candidate.
    lam_major = jnp.maximum(alpha, 0)
    lam_major = lam_major / jnp.sum(lam_major)
    h = _tmv(c.pts, lam_major)
    x = h - qh
    upper = jnp.sqrt(_dot(x, x))
    scores = jnp.where(cd.in_corral | cd.bad, jnp.inf, _tmv(cd.pts_t, x))
    j = jnp.argmin(scores)
    hot_j = jnp.arange(scores.shape[0]) == j
    fw = _dot(h, x) - jnp.min(scores)  # (h - p_j)^T x: how much p_j improves
    want = interior & (fw > 0.5 * upper * (rtol * upper + atol)) & (upper > atol)
    has_free = ~jnp.all(a)
    slot = jnp.argmin(a)  # the first free slot
    hot_slot = slots == slot
    pj = cd.pts_t[:, j]
    zj = pj - c.ref
    u, s = _projection(c, af, zj)
    dependent = ~(s > dep_tol * _dot(zj, zj))
    do_add = want & has_free & ~dependent
    mark_bad = want & has_free & dependent
    full = want & ~has_free
    r_j = _dot(zj, qh - c.ref)

    # Minor step: move towards alpha until a weight hits zero, drop that point.
    lam = c.lam
    denom = lam - alpha
    ratio = jnp.where(denom > 0, lam / jnp.where(denom > 0, denom, 1), 0)
    ratio = jnp.where(a & (alpha <= 0), ratio, jnp.inf)
    i = jnp.argmin(ratio)
    hot_i = slots == i
    theta = jnp.clip(jnp.min(ratio), 0, 1)
    lam_minor = jnp.where(a & ~hot_i, jnp.maximum(lam + theta * (alpha - lam), 0), 0)
    lam_minor = lam_minor / jnp.sum(lam_minor)
    do_remove = ~interior

    # Wolfe's steps never increase ||x - q||. One that would, or that would leave a
    # non-finite value, is rounding beyond repair within the round: it is not taken and
    # the round ends (the next one starts from a cleaned-up inverse).
    new_upper = jnp.where(interior, upper, jnp.sqrt(jnp.sum((_tmv(c.pts, lam_minor) - qh) ** 2)))
    e_slot = jnp.append(hot_slot, False).astype(af.dtype)
    e_i = jnp.append(hot_i, False)
    w = c.minv[i]
    wi = _pick(w, e_i)
    safe_s = jnp.where(do_add, s, 1)
    safe_wi = jnp.where(wi != 0, wi, 1)
    sol_add = sol + (u - e_slot) * (_dot(u, c.rhs) - r_j) / safe_s
    sol_remove = jnp.where(e_i, 0, sol - w * _pick(sol, e_i) / safe_wi)
    sol_new = jnp.where(do_add, sol_add, jnp.where(do_remove, sol_remove, sol))
    broken = (
        ~(new_upper <= st.upper * (1 + 1e-5) + 1e-6)
        | ~jnp.all(jnp.isfinite(sol_new))
        | (do_remove & (wi == 0))
    )
    do_add = do_add & ~broken
    do_remove = do_remove & ~broken
    mark_bad = mark_bad & ~broken

    # Rank-one updates of minv (one fused pass) and of sol = minv @ rhs (O(m)).
    v = jnp.where(do_add, u - e_slot, w)
    coef = jnp.where(do_add, 1 / safe_s, jnp.where(do_remove, -1 / safe_wi, 0))
    minv = _rank_one(c.minv, v, coef, do_add, slot, do_remove, i)
    add_here = do_add & hot_slot
    drop_here = do_remove & hot_i
    rhs = jnp.where(
        jnp.append(add_here, False), r_j, jnp.where(jnp.append(drop_here, False), 0, c.rhs)
    )
    corral = _Corral(
        idx=jnp.where(add_here, _pick(cd.idx, hot_j), c.idx).astype(c.idx.dtype),
        active=(a | add_here) & ~drop_here,
        lam=jnp.where(broken, lam, jnp.where(interior, lam_major, lam_minor)),
        pts=jnp.where(add_here[:, None], pj, c.pts),
        minv=minv,
        rhs=rhs,
        sol=jnp.where(broken, sol, sol_new),
        ref=c.ref,
    )
    left = do_remove & (cd.idx == _pick(c.idx, hot_i))
    return _Inner(
        corral,
        cd._replace(
            in_corral=(cd.in_corral & ~left) | (do_add & hot_j), bad=cd.bad | (mark_bad & hot_j)
        ),
        st.steps + (do_add | do_remove).astype(jnp.int32),
        st.added + do_add.astype(jnp.int32),
        (interior & (~want | full)) | broken,
        st.full | (full & ~broken),
        jnp.where(broken, st.upper, new_upper),
    )


def _block_minima(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """For k blocks of the entries of ``scores`` (n,) (block b: entries b, b + k, ...),
    each block's (approximate) argmin, and whether it is finite. The argmin is found by
    one integer min over keys that hold the score in their high bits and the position in
    the block in the low bits (no sort, no variadic reduction); the best entry overall
    is always among them. For n <= k, every entry."""
    n = scores.shape[0]
    if n <= k:
        return jnp.arange(k) % n, jnp.isfinite(scores)[jnp.arange(k) % n] & (jnp.arange(k) < n)
    size = -(-n // k)
    bits = max(1, (size - 1).bit_length())
    itype = jnp.int32 if scores.dtype.itemsize == 4 else jnp.int64
    keys = jax.lax.bitcast_convert_type(scores, itype)
    keys = jnp.where(keys < 0, keys ^ jnp.iinfo(itype).max, keys)  # order of the floats
    big = jnp.iinfo(itype).max
    keys = jnp.pad(keys, (0, size * k - n), constant_values=big).reshape(size, k)
    low = (1 << bits) - 1
    keys = (keys & ~low) | jnp.arange(size, dtype=itype)[:, None]
    best = jnp.min(keys, axis=0)
    idx = (best & low).astype(jnp.int32) * k + jnp.arange(k, dtype=jnp.int32)
    inf_key = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, scores.dtype), itype)
    ok = (best | low) < (inf_key | low)
    return jnp.minimum(idx, n - 1), ok & (idx < n)


def _candidates(prob: _Problem, scores: jax.Array, c: _Corral, k: int) -> _Cands:
    """The next round's candidates: the best new point of each of k blocks (corral points
    and masked points excluded)."""
    scores = scores.at[c.idx].max(jnp.where(c.active, jnp.inf, -jnp.inf))
    idx, ok = _block_minima(scores, k)
    return _Cands(idx, prob.pts[idx].T, jnp.zeros(k, bool), ~ok)


def _solve_one(
    prob: _Problem,
    qh: jax.Array,
    valid: jax.Array,
    rtol,
    atol,
    *,
    m: int,
    k: int,
    max_rounds: int,
    max_iter: int,
) -> _Outer:
    """Wolfe's algorithm with column generation for the (scaled) query ``qh``."""
    d = prob.pts.shape[1]
    dtype = prob.pts.dtype
    # A point this close to the corral's affine hull (squared, relative) would make the
    # bordered matrix too ill-conditioned to update in this precision: it is not added.
    dep_tol = 10 * jnp.finfo(dtype).eps
    finite = jnp.all(jnp.isfinite(qh)) & jnp.all(jnp.where(valid, jnp.isfinite(prob.sq), True))
    # The first corral: the nearest point; the first candidates: the next nearest.
    d2 = prob.sq - 2 * (qh @ prob.pts.T) + _dot(qh, qh)
    d2 = jnp.where(valid & jnp.isfinite(d2), d2, jnp.inf)
    j0 = jnp.argmin(d2).astype(jnp.int32)
    p0 = jnp.where(finite, prob.pts[j0], 0)
    corral = _Corral(
        idx=jnp.zeros(m, jnp.int32).at[0].set(j0),
        active=jnp.zeros(m, bool).at[0].set(True),
        lam=jnp.zeros(m, dtype).at[0].set(1),
        pts=jnp.zeros((m, d), dtype).at[0].set(p0),
        # The inverse of [[0, 1], [1, 0]] (slot 0 and the border, about ref = p0).
        minv=jnp.eye(m + 1, dtype=dtype)
        .at[0, 0]
        .set(0)
        .at[m, m]
        .set(0)
        .at[0, m]
        .set(1)
        .at[m, 0]
        .set(1),
        rhs=jnp.zeros(m + 1, dtype),
        sol=jnp.zeros(m + 1, dtype),
        ref=p0,
    )
    status = jnp.where(~finite, NONFINITE, jnp.where(jnp.any(valid), CONVERGED, EMPTY))
    init = _Outer(
        corral,
        _candidates(prob, d2, corral, k),
        upper=jnp.sqrt(jnp.maximum(d2[j0], 0)),
        gap=jnp.asarray(jnp.inf, dtype),
        rounds=jnp.int32(0),
        steps=jnp.int32(0),
        status=status.astype(jnp.int32),
        done=status != CONVERGED,
    )

    def round_(st: _Outer) -> _Outer:
        inner = jax.lax.while_loop(
            lambda s: ~s.done & (s.steps < max_iter),
            lambda s: _inner_step(s, qh, rtol, atol, dep_tol),
            _Inner(
                _refresh(st.corral, qh),
                st.cands,
                jnp.int32(0),
                jnp.int32(0),
                jnp.bool_(False),
                jnp.bool_(False),
                st.upper,
            ),
        )
        c = inner.corral
        # The full pass: the certificate, and the next round's candidates.
        h = _tmv(c.pts, c.lam)
        x = h - qh
        upper = jnp.sqrt(_dot(x, x))
        scores = jnp.where(valid, x @ prob.pts.T, jnp.inf)
        fw = jnp.maximum(_dot(h, x) - jnp.min(scores), 0)  # max_i (h - p_i)^T x
        gap = jnp.where(upper > 0, jnp.minimum(upper, fw / jnp.where(upper > 0, upper, 1)), 0)
        ok = jnp.isfinite(upper) & jnp.isfinite(gap)
        rounds = st.rounds + 1
        status = jnp.select(
            [~ok, ok & (gap <= rtol * upper + atol), inner.full, inner.added == 0],
            [NONFINITE, CONVERGED, SUPPORT_FULL, STALLED],
            jnp.where(rounds >= max_rounds, MAX_ROUNDS, -1),
        ).astype(jnp.int32)
        return _Outer(
            c,
            _candidates(prob, scores, c, k),
            upper,
            gap,
            rounds,
            st.steps + inner.steps,
            jnp.maximum(status, 0),
            status >= 0,
        )

    return jax.lax.while_loop(lambda st: ~st.done, round_, init)


def _problem(points: jax.Array) -> _Problem:
    center = jnp.mean(points, axis=0)
    radius = jnp.max(jnp.sqrt(jnp.sum((points - center) ** 2, axis=1)))
    radius = jnp.where(radius > 0, radius, 1)
    pts = (points - center) / radius
    return _Problem(pts, jnp.sum(pts**2, axis=1), center, radius)


def _result(prob: _Problem, st: _Outer) -> HullResult:
    c = st.corral
    weights = jnp.where(c.active, c.lam, 0)
    weights = weights / jnp.where(jnp.sum(weights) > 0, jnp.sum(weights), 1)
    distance = prob.radius * st.upper
    distance = jnp.where(st.status == NONFINITE, jnp.nan, distance)
    distance = jnp.where(st.status == EMPTY, jnp.inf, distance)
    return HullResult(
        distance=distance,
        weights=weights,
        support=jnp.where(c.active, c.idx, 0),
        gap=jnp.where(st.status == EMPTY, jnp.inf, prob.radius * st.gap),
        converged=st.status == CONVERGED,
        status=st.status,
        iterations=st.steps,
        passes=st.rounds + 1,
    )


@functools.partial(
    jax.jit, static_argnames=("m", "k", "max_rounds", "max_iter", "batch_size", "batched")
)
def _hull_core(points, q, mask, rtol, atol, *, m, k, max_rounds, max_iter, batch_size, batched):
    n = points.shape[0]
    prob = _problem(points)
    solve = functools.partial(_solve_one, m=m, k=k, max_rounds=max_rounds, max_iter=max_iter)
    rtol = jnp.asarray(rtol, points.dtype)
    atol = jnp.asarray(atol, points.dtype)

    def one(qi, valid):
        qh = (qi - prob.center) / prob.radius
        return _result(prob, solve(prob, qh, valid, rtol, atol))

    if not batched:
        return one(q, jnp.ones(n, bool) if mask is None else mask)
    # One per-query mask always, so that every batched call of a shape shares its code.
    masks = jnp.ones((q.shape[0], n), bool) if mask is None else mask
    masks = jnp.broadcast_to(masks, (q.shape[0], n))
    # Queries of a chunk run as many steps as the slowest of them: chunk queries of like
    # difficulty together, ordered by the distance to their nearest point (one pass).
    qh = (q - prob.center) / prob.radius
    near = jnp.min(jnp.where(masks, prob.sq - 2 * (qh @ prob.pts.T), jnp.inf), axis=1)
    near = near + jnp.sum(qh**2, axis=1)
    order = jnp.argsort(near)
    res = jax.lax.map(
        lambda a: one(*a), (q[order], masks[order]), batch_size=min(batch_size, q.shape[0])
    )
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    return jax.tree.map(lambda a: a[inverse], res)


def hull_distance(
    points: Any,
    q: Any,
    *,
    mask: Any = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    max_support: int | None = None,
    candidates: int | None = None,
    max_rounds: int = 50,
    max_iter: int | None = None,
    batch_size: int = 64,
) -> HullResult:
    """Distance from ``q`` to the convex hull of ``points``, with convex weights and a certificate.

    Solves ``min ||points^T a - q||`` over the simplex ``a >= 0, sum(a) = 1``
    by Wolfe's minimum-norm-point algorithm (an active-set method: the answer
    lies on at most d + 1 affinely independent points, the "corral") with
    column generation: each round runs Wolfe's steps on the corral and
    ``candidates`` points picked by one full pass over all points (those most
    violating optimality), then a full pass checks the certificate. The
    points' Gram matrix is never formed; the full passes are matrix-vector
    products (matrix-matrix across a batch of queries). See docs/features.md.

    Args:
      points: (n, d) the points (flatten images first).
      q: (d,) one query, or (Q, d) a batch: then the queries are solved
        ``batch_size`` at a time, sharing the points (the result's fields get
        a leading Q axis). ``jax.vmap`` over one-query calls works too.
      mask: optional (n,) bool (or (Q, n) with a batch): the hull of the
        selected points only (the shapes, hence the compiled code, stay the
        same for every subset).
      rtol, atol: converged when ``gap <= rtol * distance + atol * radius``,
        ``radius`` being the largest distance of a point from the centroid of
        all points (traced).
      max_support: corral slots (static); default ``min(n, d + 1)``, which
        always suffices. A smaller value bounds memory; a query needing more
        ends with status ``support_full``.
      candidates: points per working set (static); default ``min(n, 2 (d + 1))``.
      max_rounds: most rounds, i.e. full passes after the first (static).
      max_iter: most Wolfe steps per round (static); default ``4 * max_support
        + candidates``.
      batch_size: queries solved together when ``q`` is a batch (static).

    Returns:
      ``HullResult(distance, weights, support, gap, converged, status,
      iterations, passes)``; ``.lower`` is the certified lower bound,
      ``.nearest(points)`` the hull point, ``.dense_weights(n)`` the weights
      over all points. Non-finite input under ``jit`` gives status
      ``nonfinite``; an all-False mask gives ``empty``.

    Raises:
      ValueError: points not (n, d), an empty set, a query of another
        dimension, a bad mask or option, or NaN/Inf values (when concrete).

    References:
      Wolfe, *Finding the nearest point in a polytope*, Math. Programming 11
      (1976). https://doi.org/10.1007/BF01580381
      Yousefzadeh, *Decision boundaries and convex hulls in the feature space
      that deep learning functions learn from images* (2022).
      https://arxiv.org/abs/2202.04052
    """
    fn = "hull_distance"
    points, q, mask = _check_points(points, q, mask, fn)
    n, d = points.shape
    m = min(n, d + 1) if max_support is None else _static_int(max_support, "max_support", fn)
    m = min(m, n)
    k = min(n, 2 * (d + 1)) if candidates is None else _static_int(candidates, "candidates", fn)
    k = min(k, n)
    max_rounds = _static_int(max_rounds, "max_rounds", fn)
    max_iter = 4 * m + k if max_iter is None else _static_int(max_iter, "max_iter", fn)
    batch_size = _static_int(batch_size, "batch_size", fn)
    rtol = _checks.check_nonnegative_float(rtol, "rtol", fn) if _checks.is_concrete(rtol) else rtol
    atol = _checks.check_nonnegative_float(atol, "atol", fn) if _checks.is_concrete(atol) else atol
    if q.ndim == 2:
        mask = jnp.broadcast_to(jnp.ones(n, bool) if mask is None else mask, (q.shape[0], n))
    return _hull_core(
        points,
        q,
        mask,
        rtol,
        atol,
        m=m,
        k=k,
        max_rounds=max_rounds,
        max_iter=max_iter,
        batch_size=batch_size,
        batched=q.ndim == 2,
    )


# --------------------------------------------------------------------------- exact membership


@functools.lru_cache(maxsize=64)
def _query_fn(options: tuple[tuple[str, Any], ...]) -> Callable:
    opts = dict(options)

    def one(points: jax.Array, q: jax.Array, mask: jax.Array) -> HullResult:
        return hull_distance(points, q, mask=mask, **opts)

    return one


def query_fn(**options: Any) -> Callable:
    """``fn(points, q, mask) -> HullResult`` for ONE query, with these ``hull_distance``
    options: the same function object for the same options, so that a mapper that caches
    compiled code by function (``bgeom.sweep``, a suite context's ``map``) compiles it once."""
    return _query_fn(tuple(sorted(options.items())))


def _flat(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(len(a), -1) if a.ndim > 2 else a


def _lp_inside(points: np.ndarray, q: np.ndarray, tol: float = 0.0) -> bool | None:
    """HiGHS LP feasibility of ``|points^T a - q|_inf <= tol, sum(a) = 1, a >= 0`` (float64;
    None: the LP did not finish)."""
    from scipy.optimize import linprog

    n = len(points)
    if tol > 0:
        res = linprog(
            np.zeros(n),
            A_ub=np.vstack([points.T, -points.T]),
            b_ub=np.concatenate([q + tol, tol - q]),
            A_eq=np.ones((1, n)),
            b_eq=[1.0],
            bounds=(0, None),
            method="highs",
        )
    else:
        a_eq = np.vstack([points.T, np.ones((1, n))])
        res = linprog(
            np.zeros(n), A_eq=a_eq, b_eq=np.append(q, 1.0), bounds=(0, None), method="highs"
        )
    if res.status == 0:
        return True
    if res.status == 2:
        return False
    return None


def _simplex_lstsq(sub: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Convex weights of the point of conv(sub) nearest to q: NNLS with a heavily weighted
    sum-to-one row (float64), normalised so that they are exactly convex."""
    from scipy.optimize import nnls

    w = 1e6
    a, _ = nnls(
        np.vstack([sub.T, np.full((1, len(sub)), w)]), np.append(q, w), maxiter=100 * len(sub)
    )
    return a / a.sum()


def _polish(
    pts: np.ndarray,
    valid: np.ndarray,
    q: np.ndarray,
    start: np.ndarray,
    tol: float,
    rounds: int = 20,
) -> tuple[bool, float] | None:
    """Decide membership in float64 from the solver's support (scaled points).

    Column generation on the host: the nearest point of the hull of a subset (starting
    with the support), then every valid point is checked against the hyperplane through
    it; the most violating points join the subset. Returns ``(True, 0)`` when a convex
    combination lies within ``tol`` of q, ``(False, lower)`` when every valid point lies
    beyond a hyperplane at distance ``lower > tol`` from q (``lower`` bounds the distance),
    ``None`` when undecided after ``rounds``."""
    subset = np.unique(start) if len(start) else valid[:1]
    d = pts.shape[1]
    for _ in range(rounds):
        x = _simplex_lstsq(pts[subset], q) @ pts[subset]
        u = x - q
        norm = float(np.linalg.norm(u))
        if norm <= max(tol, 1e-12):
            return True, 0.0
        u /= norm
        scores = (pts[valid] - q) @ u
        if scores.min() > max(tol, 1e-12):
            return False, float(scores.min())
        # Points beyond the hyperplane through x (closer to q than x along u).
        beyond = valid[scores < norm - 1e-12]
        beyond = beyond[~np.isin(beyond, subset)]
        if not len(beyond):
            return None
        order = np.argsort((pts[beyond] - q) @ u)[: 2 * (d + 1)]
        subset = np.union1d(subset, beyond[order])
    return None


def hull_membership(
    points: Any,
    queries: Any,
    *,
    mask: Any = None,
    tol: float = 1e-6,
    map_fn: Callable | None = None,
    **options: Any,
) -> Membership:
    """Exact answers to "is q in the convex hull of the points?" for a batch of queries.

    ``hull_distance`` first; then, for each query, column generation in
    float64 on the host, from the solver's support: the nearest point x of the
    hull of a few points (NNLS with a weighted sum-to-one row, normalised), and
    the hyperplane through x normal to ``x - q`` checked against every point.
    **Outside** when every point lies beyond it at more than ``tol`` from q
    (``min_i (p_i - q)^T u > tol``: a certificate, and ``lower`` bounds the
    distance); **inside** when x lies within ``tol`` of q (x is a convex
    combination of the points); otherwise the most violating points join the
    subset and the step repeats. An LP (scipy HiGHS, ``|points^T a - q|_inf <=
    tol``) on all points decides what 20 rounds leave open. Distances are in
    units of the points' radius (their largest distance from the centroid);
    points and queries are centred and scaled as in the solver. ``tol``
    absorbs the rounding of float32 inputs: a point of an edge of the hull,
    computed in float32, lies about 1e-7 off it. See docs/features.md.

    Args:
      points: (n, d) points (or (n, ...) arrays, flattened).
      queries: (Q, d) queries (or (Q, ...)).
      mask: optional (n,) or (Q, n) bool: the hull of the selected points.
      tol: the distance (relative to the radius) up to which a query counts as
        inside; 0 asks the exact question of the data as given.
      map_fn: optional ``map_fn(fn, points, queries, mask, in_axes=...)`` that
        evaluates ``fn(points, q, mask)`` for every query (e.g. a suite
        context's sharded map); default: ``hull_distance`` on the batch.
      **options: ``hull_distance`` options (``rtol``, ``max_rounds``, ...).

    Returns:
      ``Membership(inside, method, distance, lower)`` (NumPy), ``method``
      indexing ``MEMBERSHIP_METHODS``.

    References:
      Yousefzadeh, *Deep learning generalization and the convex hull of
      training sets* (2021). https://arxiv.org/abs/2101.09849
    """
    pts = _flat(points)
    qs = _flat(queries)
    if qs.ndim != 2:
        raise ValueError(f"hull_membership: queries must be a batch (Q, d); got {qs.shape}.")
    pts_j, qs_j, mask_j = _check_points(pts, qs, mask, "hull_membership")
    masks_j = jnp.broadcast_to(
        jnp.ones(len(pts_j), bool) if mask_j is None else mask_j, (len(qs_j), len(pts_j))
    )
    if map_fn is None:
        res = hull_distance(pts_j, qs_j, mask=masks_j, **options)
    else:
        res = map_fn(query_fn(**options), pts_j, qs_j, masks_j, in_axes=(None, 0, 0))
    distance = np.asarray(res.distance, np.float64)
    support = np.asarray(res.support)
    weights = np.asarray(res.weights, np.float64)
    p64 = np.asarray(pts, np.float64)
    q64 = np.asarray(qs, np.float64)
    masks = (
        np.ones((len(q64), len(p64)), bool)
        if mask is None
        else np.broadcast_to(np.asarray(mask, bool), (len(q64), len(p64)))
    )
    center = p64.mean(0)
    radius = float(np.max(np.linalg.norm(p64 - center, axis=1))) or 1.0
    p64 = (p64 - center) / radius
    q64 = (q64 - center) / radius
    inside = np.zeros(len(q64), bool)
    method = np.full(len(q64), MEMBERSHIP_METHODS.index("lp"), np.int8)
    lower = np.zeros(len(q64))
    for i in range(len(q64)):
        valid = np.flatnonzero(masks[i])
        verdict = _polish(p64, valid, q64[i], support[i][weights[i] > 0], tol)
        if verdict is None:  # undecided: the LP on all points
            lp = _lp_inside(p64[valid], q64[i], tol)
            inside[i] = distance[i] == 0.0 if lp is None else lp
            continue
        inside[i], sep = verdict
        lower[i] = sep * radius
        method[i] = MEMBERSHIP_METHODS.index("combination" if inside[i] else "separated")
    return Membership(inside, method, distance, lower)


# --------------------------------------------------------------------------- class polyhedra


def last_layer(params: Any, name: str = "head") -> tuple[jax.Array, jax.Array]:
    """``(W, b)`` of the final linear layer of a bgeom model: ``logits = W f + b``.

    See docs/features.md.

    Args:
      params: the model's parameters (``TrainResult.params``, ``Member.params``
        or the ``params`` of ``bgeom.models.functional``); a dict-like pytree
        with ``params[name]["kernel"]`` (d, L) and ``params[name]["bias"]`` (L,).
        Stacked ensemble parameters give stacked ``(W, b)``.
      name: the layer's name (bgeom's models call it ``head``).

    Returns:
      ``W`` (L, d) (or (members, L, d)) and ``b`` (L,), so that the logits of
      features ``f`` are ``W @ f + b``.
    """

    def value(v: Any) -> jax.Array:
        get = getattr(v, "get_value", None)
        return jnp.asarray(get() if callable(get) else v)

    try:
        layer = params[name]
        kernel, bias = value(layer["kernel"]), value(layer["bias"])
    except (KeyError, TypeError, IndexError):
        raise ValueError(
            f"last_layer: params has no linear layer {name!r} with 'kernel' and 'bias'; pass "
            "the parameters of a bgeom model, or (W, b) yourself (logits = W @ f + b)."
        ) from None
    return jnp.swapaxes(kernel, -1, -2), bias


def _check_head(w: Any, b: Any, fn_name: str) -> tuple[jax.Array, jax.Array]:
    w, b = jnp.asarray(w), jnp.asarray(b)
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise ValueError(
            f"{fn_name}: the last layer must be W (L, d) and b (L,) with logits = W @ f + b; got "
            f"W {tuple(w.shape)} and b {tuple(b.shape)}. bgeom.features.last_layer(params) "
            "extracts them from a bgeom model."
        )
    if w.shape[0] < 2:
        raise ValueError(f"{fn_name}: the classifier must have at least 2 classes.")
    return w, b


def class_polyhedron(w: Any, b: Any, label: Any) -> Polyhedron:
    """The region of class ``label`` in the last hidden layer: ``{f : A f + c >= 0}``.

    ``A_j = w_label - w_j``, ``c_j = b_label - b_j``: f is classified ``label``
    (up to ties) iff every slack is >= 0. ``label`` may be traced (vmap over
    classes). See docs/features.md.

    Args:
      w: (L, d) last-layer weights; b: (L,) biases (``last_layer``).
      label: the class.

    Returns:
      ``Polyhedron(normals, offsets, mask, label)``; ``.slack(f)``.
    """
    w, b = _check_head(w, b, "class_polyhedron")
    label = jnp.asarray(label, jnp.int32)
    mask = jnp.arange(w.shape[0]) != label
    normals = jnp.where(mask[:, None], w[label] - w, 0)
    return Polyhedron(normals, jnp.where(mask, b[label] - b, 0), mask, label)


def class_facets(w: Any, b: Any, label: int, *, nonnegative: bool = True) -> Facets:
    """Which of the L - 1 constraints of a class polyhedron are facets (HiGHS LPs).

    Constraint j is a facet when it is not redundant: minimising ``A_j f + c_j``
    over the other constraints (and ``f >= 0`` when ``nonnegative``, the domain
    of ReLU features) goes below 0 (or is unbounded). Host function (NumPy). See
    docs/features.md.

    Args:
      w, b: the last layer (``last_layer``).
      label: the class (a Python int).
      nonnegative: restrict to the orthant ``f >= 0``.

    Returns:
      ``Facets(is_facet, min_slack, empty)``.
    """
    from scipy.optimize import linprog

    w, b = (np.asarray(a, np.float64) for a in _check_head(w, b, "class_facets"))
    num, d = w.shape
    label = int(label)
    if not 0 <= label < num:
        raise ValueError(f"class_facets: label must be in [0, {num}); got {label}.")
    a = w[label] - w
    c = b[label] - b
    scale = float(np.max(np.abs(a))) or 1.0
    bounds = (0, None) if nonnegative else (None, None)
    others = [j for j in range(num) if j != label]
    # The whole region first: an empty region has no facet.
    feas = linprog(
        np.zeros(d), A_ub=-a[others] / scale, b_ub=c[others] / scale, bounds=bounds, method="highs"
    )
    is_facet = np.zeros(num, bool)
    min_slack = np.full(num, np.nan)
    if feas.status == 2:
        return Facets(is_facet, min_slack, True)
    for j in others:
        rest = [k for k in others if k != j]
        res = linprog(
            a[j] / scale,
            A_ub=-a[rest] / scale if rest else None,
            b_ub=c[rest] / scale if rest else None,
            bounds=bounds,
            method="highs",
        )
        if res.status == 3:
            min_slack[j] = -np.inf
        elif res.status == 0:
            min_slack[j] = res.fun * scale + c[j]
        is_facet[j] = min_slack[j] < -1e-9 * (scale + abs(c[j]))
    return Facets(is_facet, min_slack, False)


@jax.jit
def _containment_core(features, labels, w, b):
    logits = features @ w.T + b
    num = w.shape[0]
    own = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    rival = jnp.max(jnp.where(jax.nn.one_hot(labels, num, dtype=bool), -jnp.inf, logits), axis=1)
    margin = own - rival
    correct = jnp.argmax(logits, axis=1) == labels
    member = labels[None, :] == jnp.arange(num)[:, None]  # (L, n)
    count = jnp.sum(member, axis=1)
    accuracy = jnp.sum(member & correct[None], axis=1) / jnp.maximum(count, 1)
    min_margin = jnp.min(jnp.where(member, margin[None], jnp.inf), axis=1)
    inside = (count > 0) & (min_margin >= 0)
    return Containment(inside, accuracy, min_margin, count)


def containment(features: Any, labels: Any, w: Any, b: Any) -> Containment:
    """Per class: does the convex hull of its training features lie in its region?

    The region is convex, so the hull of the class-i features lies in it iff
    every one of them does, i.e. iff they are all classified i (a tie counts as
    inside the closed region): containment holds exactly for the classes whose
    training accuracy is 100 %. Composes with ``jax.jit`` and ``jax.vmap``
    (over ensembles of ``(W, b)``). See docs/features.md.

    Args:
      features: (n, d) training features; labels: (n,) their classes.
      w, b: the last layer (``last_layer``).

    Returns:
      ``Containment(inside, accuracy, min_margin, count)``, each (L,).
    """
    w, b = _check_head(w, b, "containment")
    features, labels = jnp.asarray(features), jnp.asarray(labels)
    if features.ndim != 2 or features.shape[1] != w.shape[1] or labels.shape != features.shape[:1]:
        raise ValueError(
            f"containment: features must be (n, {w.shape[1]}) with labels (n,); got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}."
        )
    return _containment_core(features, labels.astype(jnp.int32), w, b)


def _project_hyperplane(f: jax.Array, a: jax.Array, beta: jax.Array, nonnegative: bool):
    """The point closest to ``f`` of ``{z : a^T z = beta}`` (and ``z >= 0`` when
    ``nonnegative``), and whether that set is non-empty.

    With the orthant this is a small QP solved exactly through its dual: the
    solution is ``z(tau) = max(f + tau a, 0)`` for the root of the nondecreasing,
    piecewise-linear ``g(tau) = a^T z(tau) = beta``; the root's interval is found
    among the breakpoints ``-f_k / a_k``, and on it g is affine."""
    if not nonnegative:
        norm2 = _dot(a, a)
        ok = norm2 > 0
        z = f - (_dot(a, f) - beta) / jnp.where(ok, norm2, 1) * a
        return z, ok
    nz = a != 0
    brk = jnp.sort(jnp.where(nz, -f / jnp.where(nz, a, 1), jnp.inf))
    finite = jnp.isfinite(brk)
    nf = jnp.sum(finite)

    def g(tau):
        return jnp.sum(a * jnp.maximum(f + tau * a, 0))

    values = jnp.where(finite, jax.vmap(g)(jnp.where(finite, brk, 0)), jnp.inf)
    p = jnp.sum(values <= beta)  # the root lies in [brk[p - 1], brk[p]]
    lo = jnp.where(p > 0, brk[jnp.maximum(p - 1, 0)], -jnp.inf)
    hi = jnp.where(p < nf, brk[jnp.minimum(p, brk.shape[0] - 1)], jnp.inf)
    mid = jnp.where(
        jnp.isfinite(lo) & jnp.isfinite(hi),
        (lo + hi) / 2,
        jnp.where(jnp.isfinite(lo), lo + 1, jnp.where(jnp.isfinite(hi), hi - 1, 0)),
    )
    active = f + mid * a > 0
    slope = jnp.sum(jnp.where(active, a * a, 0))
    intercept = jnp.sum(jnp.where(active, a * f, 0))
    tau = jnp.where(slope > 0, (beta - intercept) / jnp.where(slope > 0, slope, 1), mid)
    z = jnp.maximum(f + tau * a, 0)
    scale = jnp.sqrt(_dot(a, a)) * (jnp.sqrt(_dot(f, f)) + 1) + jnp.abs(beta)
    ok = jnp.abs(_dot(a, z) - beta) <= 1e-4 * scale
    return z, ok


@functools.partial(jax.jit, static_argnames=("nonnegative",))
def _boundary_core(w, b, f, *, nonnegative):
    logits = w @ f + b
    label = jnp.argmax(logits).astype(jnp.int32)
    poly = class_polyhedron(w, b, label)
    z, ok = jax.vmap(lambda a, c: _project_hyperplane(f, a, -c, nonnegative))(
        poly.normals, poly.offsets
    )
    dist = jnp.sqrt(jnp.sum((z - f) ** 2, axis=1))
    dist = jnp.where(poly.mask & ok, dist, jnp.inf)
    adv = jnp.argmin(dist).astype(jnp.int32)
    finite = jnp.all(jnp.isfinite(logits)) & jnp.all(jnp.isfinite(f))
    found = jnp.isfinite(dist[adv])
    status = jnp.where(finite, jnp.where(found, CONVERGED, NO_BOUNDARY), NONFINITE)
    return FeatureBoundary(
        point=z[adv],
        distance=jnp.where(finite & found, dist[adv], jnp.inf),
        label=label,
        adv_label=adv,
        facet_distances=jnp.where(finite, dist, jnp.inf),
        converged=finite & found,
        status=status.astype(jnp.int32),
    )


def closest_boundary_point(w: Any, b: Any, f: Any, *, nonnegative: bool = True) -> FeatureBoundary:
    """The closest point of the decision boundary to the feature vector ``f``.

    f lies in the polyhedron of its class ``i = argmax(W f + b)``; the closest
    point of the polyhedron's boundary is the closest, over the facets j, of
    the projections of f onto the hyperplane ``A_j z + c_j = 0`` (intersected
    with ``z >= 0`` when ``nonnegative``: a small QP per facet, solved exactly
    through its one-dimensional dual). Without the orthant this is f's
    distance to the nearest pairwise hyperplane (DeepFool's one step in
    feature space). Composes with ``jax.jit`` and ``jax.vmap``. See
    docs/features.md.

    Args:
      w, b: the last layer (``last_layer``).
      f: (d,) one feature vector (>= 0 when ``nonnegative``).
      nonnegative: stay in the orthant of ReLU features (static).

    Returns:
      ``FeatureBoundary(point, distance, label, adv_label, facet_distances,
      converged, status)``.

    References:
      Yousefzadeh, *Decision boundaries and convex hulls in the feature space
      that deep learning functions learn from images* (2022).
      https://arxiv.org/abs/2202.04052
    """
    w, b = _check_head(w, b, "closest_boundary_point")
    f = jnp.asarray(f)
    if f.shape != (w.shape[1],):
        raise ValueError(
            f"closest_boundary_point: f must be ONE feature vector of shape ({w.shape[1]},); got "
            f"{tuple(f.shape)}. Map over a batch with jax.vmap."
        )
    return _boundary_core(
        w, b, f.astype(jnp.result_type(w.dtype, f.dtype)), nonnegative=bool(nonnegative)
    )


# --------------------------------------------------------------------------- reaching features


class _ReachState(NamedTuple):
    x: jax.Array
    opt: Any
    best_x: jax.Array
    best_loss: jax.Array


@functools.partial(jax.jit, static_argnames=("features_fn", "steps", "bounds"))
def _reach_core(features_fn, params, x, target, learning_rate, tol, *, steps, bounds):
    tx = optax.adam(learning_rate)
    norm2 = jnp.maximum(_dot(target, target), jnp.finfo(x.dtype).tiny)

    def loss(xp):
        diff = features_fn(params, xp) - target
        return _dot(diff, diff) / norm2

    def project(xp):
        return xp if bounds is None else optax.projections.projection_box(xp, *bounds)

    def step(st: _ReachState, _):
        value, grad = jax.value_and_grad(loss)(st.x)
        better = value < st.best_loss
        updates, opt = tx.update(grad, st.opt, st.x)
        new_x = project(optax.apply_updates(st.x, updates))
        return _ReachState(
            new_x, opt, jnp.where(better, st.x, st.best_x), jnp.where(better, value, st.best_loss)
        ), None

    start = project(x)
    init = _ReachState(start, tx.init(start), start, jnp.asarray(jnp.inf, x.dtype))
    st, _ = jax.lax.scan(step, init, None, length=steps)
    last = loss(st.x)
    best_x = jnp.where(last < st.best_loss, st.x, st.best_x)
    feats = features_fn(params, best_x)
    error = jnp.sqrt(_dot(feats - target, feats - target) / norm2)
    initial = jnp.sqrt(loss(x))
    finite = jnp.isfinite(error) & jnp.all(jnp.isfinite(best_x))
    ok = finite & (error <= tol)
    status = jnp.where(finite, jnp.where(ok, CONVERGED, NOT_REACHED), NONFINITE)
    return ReachResult(
        image=best_x,
        features=feats,
        error=error,
        initial_error=initial,
        distance=jnp.sqrt(jnp.sum((best_x - x) ** 2)),
        converged=ok,
        status=status.astype(jnp.int32),
    )


def reach_features(
    features_fn: Callable,
    params: Any,
    x: Any,
    target: Any,
    *,
    steps: int = 300,
    learning_rate: float = 0.01,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    tol: float = 0.05,
) -> ReachResult:
    """An image near ``x`` whose features reach the feature vector ``target``.

    Minimises ``||phi(x') - target||^2 / ||target||^2`` over images x' from
    ``x`` with Adam (optax), each iterate projected onto the box ``bounds``
    (``optax.projections.projection_box``); the best iterate is returned.
    Composes with ``jax.jit`` and ``jax.vmap``. See docs/features.md.

    Args:
      features_fn: ``features_fn(params, x)``, the features of ONE image (static).
      params: its parameters.
      x: (H, W, C) the starting image.
      target: (d,) the feature vector to reach.
      steps: Adam steps (static).
      learning_rate: Adam's step size.
      bounds: ``(low, high)`` pixel box, or None (static).
      tol: converged when the relative feature error is <= tol.

    Returns:
      ``ReachResult(image, features, error, initial_error, distance, converged,
      status)``; status ``converged``, ``not_reached`` or ``nonfinite``.
    """
    fn = "reach_features"
    x = _checks.check_example(x, fn)
    target = jnp.asarray(target)
    out = jax.eval_shape(features_fn, params, x)
    if len(out.shape) != 1 or target.shape != out.shape:
        raise ValueError(
            f"{fn}: features_fn(params, x) must return a vector like target; got "
            f"{tuple(out.shape)} and target {tuple(target.shape)}."
        )
    steps = _static_int(steps, "steps", fn)
    if bounds is not None:
        bounds = (float(bounds[0]), float(bounds[1]))
        if not bounds[0] < bounds[1]:
            raise ValueError(f"{fn}: bounds must be (low, high) with low < high; got {bounds}.")
    return _reach_core(
        features_fn,
        params,
        x,
        target.astype(x.dtype),
        learning_rate,
        tol,
        steps=steps,
        bounds=bounds,
    )


# --------------------------------------------------------------------------- morphing


def _first(t: jax.Array, hit: jax.Array) -> jax.Array:
    """The first ``t`` where ``hit`` (``inf`` if none)."""
    return jnp.where(jnp.any(hit), t[jnp.argmax(hit)], jnp.inf)


def morph(
    features_fn: Callable,
    params: Any,
    x1: Any,
    x2: Any,
    head: tuple[Any, Any],
    points: Any = None,
    *,
    steps: int = 33,
    mask: Any = None,
    **options: Any,
) -> MorphResult:
    """Features of the pixel path from ``x1`` to ``x2`` against the straight path in feature space.

    The images ``(1 - t) x1 + t x2`` are mapped to ``phi`` and compared with
    ``(1 - t) phi(x1) + t phi(x2)``: their classes under the last layer, their
    distance to the convex hull of ``points`` (``hull_distance``), and where
    each path first crosses the decision boundary or leaves the hull. On the
    straight path the crossing is exact (the slacks are affine in t). Composes
    with ``jax.jit`` and ``jax.vmap`` over pairs. See docs/features.md.

    Args:
      features_fn: ``features_fn(params, x)`` (static).
      params: its parameters.
      x1, x2: (H, W, C) the two images.
      head: ``(W, b)``, the last layer (``last_layer``).
      points: (n, d) the feature vectors whose hull is measured (e.g. training
        features), or None: then the hull fields are NaN (distances), False
        (``outside``) and ``inf`` (exits), for a caller that measures them itself
        (``hull_membership`` decides exactly).
      steps: points on each path, t = 0 ... 1 (static).
      mask: optional (n,) bool selecting the hull's points.
      **options: ``hull_distance`` options.

    Returns:
      A ``MorphResult``.
    """
    fn = "morph"
    x1 = _checks.check_example(x1, fn)
    x2 = _checks.check_example(x2, fn)
    if x1.shape != x2.shape:
        raise ValueError(f"{fn}: x1 and x2 must have the same shape; got {x1.shape}, {x2.shape}.")
    w, b = _check_head(*head, fn)
    steps = _static_int(steps, "steps", fn, minimum=2)
    t = jnp.linspace(0.0, 1.0, steps, dtype=x1.dtype)
    shape = (-1,) + (1,) * x1.ndim
    images = (1 - t.reshape(shape)) * x1[None] + t.reshape(shape) * x2[None]
    feats = jax.vmap(features_fn, in_axes=(None, 0))(params, images)
    straight = (1 - t[:, None]) * feats[0] + t[:, None] * feats[-1]
    if points is None:
        distance = jnp.full(2 * steps, jnp.nan, feats.dtype)
        outside = jnp.zeros(2 * steps, bool)
        solved = jnp.bool_(True)
    else:
        res = hull_distance(points, jnp.concatenate([feats, straight]), mask=mask, **options)
        pts = jnp.asarray(points)
        centre = jnp.mean(pts, axis=0)
        radius = jnp.max(jnp.sqrt(jnp.sum((pts - centre) ** 2, axis=1)))
        distance = res.distance
        outside = res.lower > options.get("atol", 1e-5) * radius
        solved = jnp.all(res.converged)
    labels = jnp.argmax(feats @ w.T + b, axis=1)
    straight_labels = jnp.argmax(straight @ w.T + b, axis=1)
    poly = class_polyhedron(w, b, labels[0])
    s1, s2 = poly.slack(feats[0]), poly.slack(feats[-1])
    leaves = poly.mask & (s2 < 0)
    t_leave = jnp.where(leaves, s1 / jnp.where(leaves, s1 - s2, 1), jnp.inf)
    finite = jnp.all(jnp.isfinite(feats))
    return MorphResult(
        t=t,
        features=feats,
        straight=straight,
        deviation=jnp.sqrt(jnp.sum((feats - straight) ** 2, axis=1)),
        labels=labels,
        straight_labels=straight_labels,
        hull_distance=distance[:steps],
        straight_hull_distance=distance[steps:],
        outside=outside[:steps],
        straight_outside=outside[steps:],
        crossing=_first(t, labels != labels[0]),
        straight_crossing=jnp.maximum(jnp.min(t_leave), 0),
        exit=_first(t, outside[:steps]),
        straight_exit=_first(t, outside[steps:]),
        converged=finite & solved,
    )


# --------------------------------------------------------------------------- outside fractions


def outside_fractions(
    train: Any,
    train_labels: Any,
    test: Any,
    test_labels: Any,
    *,
    num_classes: int | None = None,
    tol: float = 1e-6,
    map_fn: Callable | None = None,
    **options: Any,
) -> OutsideFractions:
    """The fraction of test points outside the convex hull of the training points.

    Overall (the hull of every training point) and per class (the test points
    of class c against the hull of the training points of class c), decided
    exactly by ``hull_membership``. Works on pixels or on features alike
    ((n, ...) arrays are flattened). Host function (NumPy). See docs/features.md.

    Args:
      train, train_labels: the training points and their classes.
      test, test_labels: the test points and their classes.
      num_classes: L (default: the largest label + 1).
      tol, map_fn: passed to ``hull_membership``.
      **options: ``hull_distance`` options.

    Returns:
      ``OutsideFractions(overall, per_class, outside, outside_class, distance,
      class_distance, lp_calls)``.

    References:
      Yousefzadeh, *Deep learning generalization and the convex hull of
      training sets* (2021). https://arxiv.org/abs/2101.09849
    """
    train, test = _flat(train), _flat(test)
    y_train, y_test = np.asarray(train_labels), np.asarray(test_labels)
    if len(y_train) != len(train) or len(y_test) != len(test):
        raise ValueError("outside_fractions: every point needs one label.")
    num = int(max(y_train.max(), y_test.max()) + 1) if num_classes is None else int(num_classes)
    overall = hull_membership(train, test, tol=tol, map_fn=map_fn, **options)
    masks = y_train[None, :] == y_test[:, None]
    missing = ~masks.any(axis=1)
    if missing.any():
        raise ValueError(
            f"outside_fractions: no training point of class(es) {sorted(set(y_test[missing]))}; "
            "drop those test points or add training points."
        )
    per = hull_membership(train, test, mask=masks, tol=tol, map_fn=map_fn, **options)
    out, out_class = ~overall.inside, ~per.inside
    per_class = np.array(
        [out_class[y_test == c].mean() if np.any(y_test == c) else np.nan for c in range(num)]
    )
    lp = MEMBERSHIP_METHODS.index("lp")
    calls = int(np.sum(overall.method == lp) + np.sum(per.method == lp))
    return OutsideFractions(
        float(out.mean()), per_class, out, out_class, overall.distance, per.distance, calls
    )
