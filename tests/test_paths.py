"""Paths inside class regions (docs/connectivity.md) and the targeted DeepFool they push with.

Hand-solvable cases: a 2-D classifier whose class-0 region is an annulus
(non-convex: a path around the hole needs anchors, a short chord does not),
convex regions (affine classifiers, a ball: never an anchor), and affine
classifiers for targeted DeepFool. Then the digits CNN, whose paths are
re-checked here on a grid independent of the library's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tol

import bgeom
from bgeom import paths

R1, R2 = 1.0, 2.0
# One classifier for every 2-D case, its shape in traced params (so that all
# cases share compiled code): class 0 on r1^2 < |x|^2 < r2^2, class 1 elsewhere.
ANNULUS = (jnp.float32(R1**2), jnp.float32(R2**2))
BALL = (jnp.float32(-1.0), jnp.float32(R2**2))  # no hole: a (convex) ball of radius R2


def annulus(params, x):
    lo, hi = params
    r2 = jnp.sum(jnp.square(x))
    return jnp.stack([-(r2 - lo) * (r2 - hi), jnp.zeros_like(r2)])


def point(a, b):
    return jnp.array([a, b], jnp.float32).reshape(2, 1, 1)


def points(xy):
    return jnp.asarray(np.asarray(xy, np.float32).reshape(-1, 2, 1, 1))


def polyline(res):
    """The distinct points of a path as (num_points, 2) float64."""
    return np.asarray(res.points, np.float64).reshape(len(res.points), -1)[: int(res.num_points)]


def segment_min_radius(a, b):
    """Exact distance from the origin to the segment [a, b]."""
    d = b - a
    t = np.clip(-np.dot(a, d) / np.dot(d, d), 0.0, 1.0)
    return float(np.linalg.norm(a + t * d))


# ------------------------------------------------------------------ the annulus


def test_opposite_sides_of_the_hole_get_a_valid_path_with_anchors():
    x1, x2 = point(-1.5, 0.3), point(1.5, 0.1)
    res = bgeom.find_path(annulus, ANNULUS, x1, x2)
    assert bool(res.connected) and int(res.status) == paths.FOUND
    assert int(res.num_anchors) >= 1
    assert not bool(res.straight_ok)  # the chord crosses the hole
    pts = polyline(res)
    np.testing.assert_array_equal(pts[0], np.ravel(x1))
    np.testing.assert_array_equal(pts[-1], np.ravel(x2))
    # Exact geometry, independent of any sampling: every segment stays in the
    # annulus (its nearest point to the origin is outside the hole, and its
    # farthest point, an endpoint, inside the outer circle).
    for a, b in zip(pts[:-1], pts[1:], strict=True):
        assert segment_min_radius(a, b) > R1
        assert max(np.linalg.norm(a), np.linalg.norm(b)) < R2
    length = np.sum(np.linalg.norm(np.diff(pts, axis=0), axis=1))
    np.testing.assert_allclose(float(res.length), length, **tol(jnp.float32, 16))
    assert float(res.length_ratio) > 1.0
    # Padding repeats x2, so the polyline through all points is the same path.
    padding = np.asarray(res.points[int(res.num_points) :]).reshape(-1, 2)
    np.testing.assert_array_equal(padding, np.broadcast_to(pts[-1], padding.shape))
    assert bool(jnp.all(res.segment_ok))


def test_a_short_chord_is_the_straight_segment():
    x1, x2 = point(1.5, 0.0), point(1.4, 0.3)
    res = bgeom.find_path(annulus, ANNULUS, x1, x2)
    assert bool(res.connected) and bool(res.straight_ok)
    assert int(res.num_anchors) == 0 and int(res.num_points) == 2
    assert int(res.segments_tested) == 1 and int(res.segments_crossing) == 0
    np.testing.assert_allclose(float(res.length_ratio), 1.0, **tol(jnp.float32))
    np.testing.assert_allclose(
        float(res.distance), float(jnp.linalg.norm(x2 - x1)), **tol(jnp.float32)
    )


def test_failures_are_statuses_not_exceptions():
    # The midpoint of these two is the centre, where the gradient vanishes: no push.
    res = bgeom.find_path(annulus, ANNULUS, point(-1.5, 0.0), point(1.5, 0.0))
    assert not bool(res.connected) and int(res.status) == paths.PUSH_FAILED
    res = bgeom.find_path(annulus, ANNULUS, point(-1.5, 0.3), point(1.5, 0.1), max_depth=0)
    assert not bool(res.connected) and int(res.status) == paths.MAX_DEPTH
    assert int(res.num_anchors) == 0 and int(res.segments_crossing) == 1
    # Points of different classes under jit, where find_path cannot check them
    # eagerly (this is its compiled core): a status, not garbage.
    res = paths._find_paths_core(
        annulus,
        ANNULUS,
        point(1.5, 0.0)[None],
        point(0.0, 0.0)[None],
        bgeom.DeepFoolOptions(candidates=2, overshoot=jnp.float32(0.02)),
        jnp.int32(10),
        max_anchors=31,
        samples=100,
        verify_samples=128,
        batch=1,
        push_depth=3.0,
    )
    assert not bool(res.connected[0]) and int(res.status[0]) == paths.LABEL_MISMATCH


def test_a_wide_hole_needs_few_anchors_with_deep_pushes():
    # Hole of radius 2 in a ring of width 1: points on opposite sides, the
    # chord through the middle of the hole.
    wide = (jnp.float32(4.0), jnp.float32(9.0))
    x1, x2 = point(-2.5 * np.cos(0.05), 2.5 * np.sin(0.05)), point(2.5, 0.02)
    res = bgeom.find_path(annulus, wide, x1, x2)
    print("wide hole: anchors", int(res.num_anchors), "length ratio", float(res.length_ratio))
    assert bool(res.converged) and int(res.status) == paths.FOUND
    assert 1 <= int(res.num_anchors) <= 8
    pts = polyline(res)
    assert all(segment_min_radius(a, b) > 2.0 for a, b in zip(pts[:-1], pts[1:], strict=True))
    assert all(np.linalg.norm(a) < 3.0 for a in pts)
    # Anchors pushed only onto the region's edge cut the same corner again and again.
    shallow = bgeom.find_path(annulus, wide, x1, x2, push_depth=1.0)
    assert int(shallow.status) == paths.MAX_ANCHORS


def disk_hole(params, x):
    """Class 1 inside the disk |x - c| < rho, class 0 everywhere else."""
    c, rho = params
    d2 = jnp.sum(jnp.square(x.reshape(-1) - c))
    return jnp.stack([d2 - rho**2, jnp.zeros_like(d2)])


DISK = (jnp.asarray([1.0, 0.0], jnp.float32), jnp.float32(0.2))


def test_a_chord_grazing_another_class_is_not_accepted():
    # The chord dips into the hole for about 6 % of its length.
    a, b = point(-1.2, 0.9975), point(1.2, 0.9975)
    ts = jnp.linspace(0.0, 1.0, 100)
    inside = np.abs(np.linspace(-1.2, 1.2, 100)) < np.sqrt(1 - 0.9975**2)
    assert 1 <= inside.sum() <= 8
    assert not bool(paths._segment_keeps(lambda z: annulus(ANNULUS, z), a, b, ts, 0))
    res = bgeom.find_path(annulus, ANNULUS, a, b)
    assert not bool(res.straight_ok) and int(res.num_anchors) >= 1
    assert bool(res.converged)


def test_a_search_too_coarse_to_see_a_hole_is_not_connected():
    # Samples at t = 0, 1/2, 1 miss the hole at t = 1/4: the search accepts the
    # chord, the dense verification refuses it.
    a, b = point(0.0, 0.05), point(4.0, 0.05)
    res = bgeom.find_path(disk_hole, DISK, a, b, samples=3)
    assert int(res.segments_tested) == 1 and int(res.num_anchors) == 0
    assert int(res.status) == paths.VERIFY_FAILED
    assert not bool(res.converged) and not bool(res.segment_ok[0])
    fine = bgeom.find_path(disk_hole, DISK, a, b)
    assert bool(fine.converged) and int(fine.num_anchors) >= 1


# Pairs on the annulus needing 0 to about 10 anchors (with overshoot 0.3), and
# pairs in the ball (a convex region).
_ANGLES = np.linspace(0.0, np.pi * 0.95, 7)
RING = (
    points(
        np.stack(
            [1.5 * np.cos(np.pi + 0.05 + 0 * _ANGLES), 1.5 * np.sin(np.pi + 0.05 + 0 * _ANGLES)], 1
        )
    ),
    points(np.stack([1.2 * np.cos(_ANGLES + 0.1), 1.2 * np.sin(_ANGLES + 0.1)], 1)),
)
_BALL_PTS = np.random.default_rng(0).uniform(-1.4, 1.4, (14, 2))  # |x| < 1.98 < R2
BALL_PAIRS = (points(_BALL_PTS[:7]), points(_BALL_PTS[7:]))
# Static options shared by the pooled tests (one compilation).
# Minimal pushes (push_depth 1): the pairs then differ widely in difficulty.
POOL = dict(max_anchors=7, max_depth=8, push=bgeom.DeepFoolOptions(overshoot=0.3), push_depth=1.0)


def test_find_paths_equals_one_by_one_find_path():
    x1, x2 = RING
    pooled = paths.find_paths(annulus, ANNULUS, x1, x2, batch=4, **POOL)
    # One by one (vmap(find_path) == this loop is checked in test_transforms.py).
    single = [bgeom.find_path(annulus, ANNULUS, a, b, **POOL) for a, b in zip(x1, x2, strict=True)]
    single = jax.tree.map(lambda *a: jnp.stack(a), *single)
    counts, status = np.asarray(single.num_anchors), np.asarray(single.status)
    print("anchors per pair:", counts, "status:", status)
    # The pairs differ in difficulty, so the pool mixes pairs and levels, and
    # one pair needs more than the 7 anchors allowed.
    assert counts.min() == 0 and counts.max() >= 3
    assert paths.MAX_ANCHORS in status and np.sum(status == paths.FOUND) >= 4
    for field in single._fields:
        u, v = np.asarray(getattr(pooled, field)), np.asarray(getattr(single, field))
        if np.issubdtype(u.dtype, np.floating):
            np.testing.assert_allclose(u, v, **tol(u.dtype, 16))
        else:
            np.testing.assert_array_equal(u, v, err_msg=field)
    # Connected paths are valid by exact geometry too.
    for i in np.flatnonzero(np.asarray(pooled.connected)):
        pts = polyline(jax.tree.map(lambda a, i=i: a[i], pooled))
        assert all(segment_min_radius(a, b) > R1 for a, b in zip(pts[:-1], pts[1:], strict=True))


def test_a_convex_region_needs_no_anchor():
    res = paths.find_paths(annulus, BALL, *BALL_PAIRS, batch=4, **POOL)
    assert bool(jnp.all(res.connected)) and bool(jnp.all(res.straight_ok))
    assert int(jnp.max(res.num_anchors)) == 0
    np.testing.assert_allclose(np.asarray(res.length_ratio), 1.0, **tol(jnp.float32))


# ------------------------------------------------------------------- pairs


def test_pair_indices_make_the_three_kinds():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    key = jax.random.PRNGKey(3)
    nat = paths.pair_indices(key, labels, 20, "natural")
    assert np.all(labels[nat.first] == labels[nat.second]) and np.all(nat.first != nat.second)
    assert np.all(nat.target == labels[nat.first])
    mix = paths.pair_indices(key, labels, 20, "natural-adversarial")
    assert np.all(labels[mix.first] == mix.target) and np.all(labels[mix.second] != mix.target)
    adv = paths.pair_indices(key, labels, 20, "adversarial")
    assert np.all(labels[adv.first] != adv.target) and np.all(labels[adv.second] != adv.target)
    assert np.all(adv.first != adv.second)
    again = paths.pair_indices(key, labels, 20, "adversarial")
    np.testing.assert_array_equal(adv.first, again.first)  # the key decides
    with pytest.raises(ValueError, match="unknown pair kind"):
        paths.pair_indices(key, labels, 2, "random")
    with pytest.raises(ValueError, match="two different labels"):
        paths.pair_indices(key, np.zeros(5, int), 2, "natural-adversarial")


# ----------------------------------------------------------------- digits CNN


def test_digits_cnn_paths_are_connected_and_really_keep_the_class(digits_cnn, digits):
    apply_fn, params = digits_cnn.apply_fn, digits_cnn.params
    predict = jax.jit(jax.vmap(lambda x: jnp.argmax(apply_fn(params, x))))
    # Key 2 happens to draw a pair whose straight segment leaves its class.
    pairs = paths.make_pairs(jax.random.PRNGKey(2), apply_fn, params, digits.x_test, 4)
    assert pairs.valid.mean() >= 0.9  # targeted DeepFool moves sources into the target
    v = pairs.valid
    np.testing.assert_array_equal(np.asarray(predict(pairs.x1[v])), pairs.label[v])
    np.testing.assert_array_equal(np.asarray(predict(pairs.x2[v])), pairs.label[v])
    res = paths.find_paths(apply_fn, params, pairs.x1[v], pairs.x2[v], max_anchors=15, batch=8)
    kind = pairs.kind[v]
    for k, name in enumerate(paths.PAIR_KINDS):
        sel = kind == k
        print(
            f"digits CNN, {name}: {int(sel.sum())} pairs, connected "
            f"{float(np.mean(res.connected[sel])):.2f}, straight segment leaves the class "
            f"{float(np.mean(~np.asarray(res.straight_ok)[sel])):.2f}, anchors "
            f"{np.asarray(res.num_anchors)[sel].tolist()}"
        )
    # Regions are (mostly) connected; two natural images of a class are joined
    # by a path (the straight one for most of them).
    assert float(np.mean(res.connected)) >= 0.75
    assert bool(np.all(np.asarray(res.connected)[kind == 0]))
    # Independent check of every connected path on a finer, shifted grid.
    t = (np.arange(301) + 0.5) / 301
    checked = 0
    for i in np.flatnonzero(np.asarray(res.connected)):
        pts = np.asarray(res.points[i])[: int(res.num_points[i])]
        for a, b in zip(pts[:-1], pts[1:], strict=True):
            line = (1 - t)[:, None, None, None] * a + t[:, None, None, None] * b
            assert np.all(np.asarray(predict(line)) == int(res.label[i]))
            checked += 1
    assert checked > 0


# ---------------------------------------------------------------- bad input


def test_points_of_different_classes_are_rejected():
    with pytest.raises(ValueError, match="classified as 0 but x2 as 1"):
        bgeom.find_path(annulus, ANNULUS, point(1.5, 0.0), point(0.0, 0.0))
    with pytest.raises(ValueError, match=r"pair 1"):
        paths.find_paths(
            annulus,
            ANNULUS,
            jnp.stack([point(1.5, 0), point(1.5, 0)]),
            jnp.stack([point(1.4, 0), point(3, 0)]),
        )


def test_points_of_different_shapes_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        bgeom.find_path(annulus, ANNULUS, point(1.5, 0.0), jnp.zeros((1, 2, 1)))
    with pytest.raises(ValueError, match="ONE example"):
        bgeom.find_path(annulus, ANNULUS, jnp.zeros((3, 2, 1, 1)), jnp.zeros((3, 2, 1, 1)))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        paths.find_paths(annulus, ANNULUS, point(1.5, 0.0), point(1.4, 0.0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"samples": 2}, "samples"),
        ({"verify_samples": 50}, "verify_samples"),
        ({"max_anchors": -1}, "max_anchors"),
        ({"max_depth": 1.5}, "max_depth"),
        ({"push": bgeom.DeepFoolOptions(overshoot=-1.0)}, "overshoot"),
        ({"push": {"overshoot": 0.1}}, "DeepFoolOptions"),
        ({"push_depth": 0.5}, "push_depth"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bgeom.find_path(annulus, ANNULUS, point(1.5, 0.0), point(1.4, 0.3), **kwargs)
