"""Feature-space geometry (bgeom.features): distances to convex hulls against exact
solvers, exact membership against LPs, class polyhedra and their facets, containment,
closest boundary points against a QP solver, reaching features, morphing, the probe.

Every hull problem of a dimension shares one point array and one batch shape (the
point subsets are masks), so the solver compiles once per dimension."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, tol
from scipy.optimize import linprog, minimize, nnls

import bgeom.probes.features  # noqa: F401  (registers the probe)
from bgeom import features as F
from bgeom import suite

N = 64  # points per set
D = 12  # the ambient dimension
SIZES = (4, 20, 64)  # hulls of the first 4 (lower-dimensional), 20 and all 64 points of a set
KINDS = ("far", "near", "inside", "on", "vertex", "far2")


def exact_distance(points, q):
    """Reference: NNLS with a heavily weighted sum-to-one row (float64)."""
    p = np.asarray(points, np.float64)
    q = np.asarray(q, np.float64)
    w = 1e5 * (1.0 + np.abs(p).max())
    a, _ = nnls(np.vstack([p.T, w * np.ones((1, len(p)))]), np.concatenate([q, [w]]), maxiter=10000)
    a = a / a.sum()
    return float(np.linalg.norm(p.T @ a - q)), p.T @ a


def lp_inside(points, q):
    p = np.asarray(points, np.float64)
    a_eq = np.vstack([p.T, np.ones((1, len(p)))])
    res = linprog(np.zeros(len(p)), A_eq=a_eq, b_eq=np.append(q, 1.0), bounds=(0, None))
    assert res.status in (0, 2)
    return res.status == 0


def make_case(seed=0):
    """Two point sets in one (2N, D) array: N points in R^12, and N points of R^5 (zero
    beyond), so one compiled solver serves intrinsic dimensions 12 and 5. Per set and
    hull size (a mask), 6 queries: far, near, inside, on the hull, a vertex, far again."""
    rng = np.random.default_rng(seed)
    sets = [rng.standard_normal((N, d)) for d in (D, 5)]
    points = np.concatenate([np.pad(p, ((0, 0), (0, D - p.shape[1]))) for p in sets])
    points = points.astype(np.float32)
    queries, masks, refs, kinds = [], [], [], []
    for offset in (0, N):
        for n in SIZES:
            valid = (np.arange(2 * N) >= offset) & (np.arange(2 * N) < offset + n)
            sub = points[valid]
            d = D if offset == 0 else 5
            far = np.zeros(D)
            far[:d] = rng.standard_normal(d)
            far = sub.mean(0) + 3.0 * far / np.linalg.norm(far) * np.abs(sub).max()
            _, nearest = exact_distance(sub, far)
            near = nearest + 0.05 * (far - nearest) / np.linalg.norm(far - nearest)
            inside = rng.dirichlet(np.ones(n)) @ sub
            far2 = sub.mean(0) - 2.0 * (far - sub.mean(0))
            for kind, q in zip(KINDS, (far, near, inside, nearest, sub[1], far2), strict=True):
                q = np.asarray(q, np.float32)
                queries.append(q)
                masks.append(valid)
                refs.append(exact_distance(sub, q)[0])
                kinds.append(kind)
    return points, np.array(queries), np.array(masks), np.array(refs), kinds


@pytest.fixture(scope="module")
def case():
    points, queries, masks, refs, kinds = make_case()
    res = F.hull_distance(points, queries, mask=masks)
    return points, queries, masks, refs, kinds, jax.tree.map(np.asarray, res)


# ------------------------------------------------------------------ hull distance


def test_distances_equal_an_exact_solver_inside_on_and_outside(case):
    points, queries, masks, refs, kinds, res = case
    assert res.converged.all(), [F.STATUS_NAMES[s] for s in res.status]
    radius = np.max(np.linalg.norm(points - points.mean(0), axis=1))
    for i, kind in enumerate(kinds):
        if refs[i] > 1e-3 * radius:  # outside: 1e-3 relative
            np.testing.assert_allclose(res.distance[i], refs[i], rtol=1e-3, err_msg=kind)
        else:  # inside or on the hull: zero up to the solver's absolute tolerance
            assert res.distance[i] <= 1e-4 * radius, (kind, res.distance[i])
    assert {k for k, r in zip(kinds, refs, strict=True) if r > 1e-3} == {"far", "near", "far2"}


def test_weights_are_a_convex_combination_reproducing_the_nearest_point(case):
    points, queries, masks, refs, kinds, res = case
    assert np.all(res.weights >= 0)
    np.testing.assert_allclose(res.weights.sum(1), 1.0, **tol(np.float32, 4))
    used = res.weights > 0
    assert np.all(np.take_along_axis(masks, res.support, 1)[used])  # only hull points
    nearest = np.asarray(F.HullResult(*map(jnp.asarray, res)).nearest(points))
    dist = np.linalg.norm(nearest - queries, axis=1)
    np.testing.assert_allclose(dist, res.distance, rtol=1e-4, atol=1e-5)
    dense = np.asarray(F.HullResult(*map(jnp.asarray, res)).dense_weights(2 * N))
    np.testing.assert_allclose(dense @ points, nearest, rtol=1e-5, atol=1e-5)
    # At most d + 1 points carry the answer; the lower-dimensional hull of 4 points, 4.
    assert used.sum(1).max() <= D + 1
    assert used[len(queries) // 2 :].sum(1).max() <= 5 + 1  # the 5-dimensional set
    assert used[np.array(masks).sum(1) == 4].sum(1).max() <= 4


def test_the_certificate_bounds_the_error_also_when_stopped_early(case):
    points, queries, masks, refs, kinds, res = case
    slack = 1e-5 * np.max(np.abs(points))
    assert np.all(res.distance >= refs - slack)
    assert np.all(res.distance - res.gap <= refs + slack)
    # A loose tolerance stops early with a large gap: the bound still holds.
    loose = jax.tree.map(
        np.asarray, F.hull_distance(points, queries, mask=masks, rtol=0.5, atol=0.2)
    )
    assert loose.passes.sum() <= res.passes.sum()
    assert np.any(loose.gap > 10 * res.gap.max())
    assert np.all(loose.distance >= refs - slack)
    assert np.all(loose.distance - loose.gap <= refs + slack)


def test_vmap_equals_a_loop_and_failures_are_statuses_under_jit(case):
    """``jax.vmap`` over queries, and the batch (sorted ``vmap`` chunks), equal one jitted
    call per query."""
    points, queries, masks, _, _, many = case
    single = jax.jit(lambda p, q, m: F.hull_distance(p, q, mask=m))
    pick = np.array([0, 2, 7, 13, 16, 27])
    vmapped = jax.jit(jax.vmap(single, in_axes=(None, 0, 0)))(points, queries[pick], masks[pick])
    for row, i in enumerate(pick):
        one = single(points, queries[i], masks[i])
        for res, r in ((many, i), (vmapped, row)):
            for field in ("distance", "weights", "gap"):
                np.testing.assert_allclose(
                    np.asarray(getattr(res, field))[r],
                    np.asarray(getattr(one, field)),
                    rtol=1e-4,
                    atol=1e-5,
                )
            for field in ("support", "status", "iterations", "passes"):
                np.testing.assert_array_equal(
                    np.asarray(getattr(res, field))[r], np.asarray(getattr(one, field))
                )
    # Traced NaN and an empty subset: statuses, not exceptions; never converged.
    bad_q = queries[0].copy()
    bad_q[1] = np.nan
    out = single(points, bad_q, masks[0])
    assert F.STATUS_NAMES[int(out.status)] == "nonfinite" and np.isnan(out.distance)
    out = single(points, queries[0], np.zeros(2 * N, bool))
    assert F.STATUS_NAMES[int(out.status)] == "empty" and np.isinf(out.distance)
    assert not out.converged


@pytest.mark.parametrize(
    "points,q,mask,message",
    [
        (np.ones((5, 3)), np.ones(4), None, "matching the points' dimension 3"),
        (np.ones((0, 3)), np.ones(3), None, "the point set is empty"),
        (np.ones(5), np.ones(5), None, "points must be a 2-D array"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), np.ones(2), None, "points contain NaN"),
        (np.ones((5, 3)), np.array([np.inf, 0.0, 0.0]), None, "q contain NaN or Inf"),
        (np.ones((5, 3)), np.ones(3), np.zeros(5, bool), "selects no point"),
        (np.ones((5, 3)), np.ones(3), np.ones(4, bool), "mask must have shape (5,)"),
    ],
)
def test_bad_input_says_what_to_do(points, q, mask, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        F.hull_distance(points, q, mask=mask)
    with pytest.raises(ValueError, match="max_support must be >= 1"):
        F.hull_distance(np.ones((5, 3)), np.ones(3), max_support=0)


# ------------------------------------------------------------------ exact membership


def test_membership_is_exact_against_an_lp(case):
    points, queries, masks, refs, kinds, res = case
    member = F.hull_membership(points, queries, mask=masks)
    methods = {F.MEMBERSHIP_METHODS[m] for m in member.method}
    for i, kind in enumerate(kinds):
        if kind != "on":  # on the boundary, up to float32 rounding: within the tolerance
            assert member.inside[i] == lp_inside(points[masks[i]], queries[i]), kind
        assert member.inside[i] == (kind in ("inside", "vertex", "on")), kind
    # Without tolerance a rounded boundary point is either side; the rest is unchanged.
    exact = F.hull_membership(points, queries, mask=masks, tol=0.0)
    off = np.array([k != "on" for k in kinds])
    np.testing.assert_array_equal(exact.inside[off], member.inside[off])
    assert "separated" in methods and "combination" in methods
    np.testing.assert_allclose(member.distance, res.distance)
    assert np.all(member.lower[member.inside] == 0) and np.all(member.lower <= refs + 1e-6)


def test_outside_fractions_per_class_and_overall():
    points, queries, _, _, kinds = make_case()
    labels = np.arange(2 * N) % 2
    test_labels = np.arange(len(queries)) % 2
    out = F.outside_fractions(points, labels, queries, test_labels)
    want_all = np.array([not lp_inside(points, q) for q in queries])
    want_class = np.array(
        [not lp_inside(points[labels == c], q) for q, c in zip(queries, test_labels, strict=True)]
    )
    np.testing.assert_array_equal(out.outside, want_all)
    np.testing.assert_array_equal(out.outside_class, want_class)
    assert out.overall == pytest.approx(want_all.mean())
    for c in (0, 1):
        assert out.per_class[c] == pytest.approx(want_class[test_labels == c].mean())
    assert np.all(out.outside_class >= out.outside)  # a class hull lies in the whole hull


# ------------------------------------------------------------------ class polyhedra


def test_last_layer_reads_the_head_of_bgeom_parameters():
    # (The probe test checks W phi(x) + b against apply_fn on a trained bgeom model.)
    kernel, bias = np.arange(12.0).reshape(6, 2), np.array([1.0, -1.0])
    w, b = F.last_layer({"head": {"kernel": kernel, "bias": bias}})
    np.testing.assert_array_equal(w, kernel.T)
    np.testing.assert_array_equal(b, bias)
    ws, bs = F.last_layer({"head": {"kernel": np.stack([kernel, 2 * kernel]), "bias": bias[None]}})
    assert ws.shape == (2, 2, 6) and bs.shape == (1, 2)
    with pytest.raises(ValueError, match="no linear layer 'out'"):
        F.last_layer({"head": {"kernel": kernel, "bias": bias}}, "out")


def test_polyhedron_slacks_are_the_classification():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3)), rng.standard_normal(4)
    f = rng.standard_normal((50, 3))
    label = np.argmax(f @ w.T + b, axis=1)
    slack = jax.vmap(lambda c: jax.vmap(F.class_polyhedron(w, b, c).slack)(f))(jnp.arange(4))
    inside = np.asarray(jnp.all(slack >= 0, axis=2))  # (class, point)
    np.testing.assert_array_equal(inside, label[None] == np.arange(4)[:, None])


def test_facets_drop_redundant_constraints():
    # Class 0 is f1 <= 0 (against class 1) and f1 <= 1/2 (class 2, redundant), in R^2.
    w = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = np.array([0.0, 0.0, -1.0])
    facets = F.class_facets(w, b, 0, nonnegative=False)
    np.testing.assert_array_equal(facets.is_facet, [False, True, False])
    assert facets.min_slack[2] == pytest.approx(1.0) and not facets.empty
    # Against class 1: f1 + f2 >= -1, a facet in R^2 but redundant in the orthant.
    w = np.array([[0.0, 0.0], [-1.0, -1.0], [1.0, -1.0]])
    b = np.array([0.0, -1.0, 0.0])
    np.testing.assert_array_equal(F.class_facets(w, b, 0, nonnegative=False).is_facet, [0, 1, 1])
    np.testing.assert_array_equal(F.class_facets(w, b, 0, nonnegative=True).is_facet, [0, 0, 1])
    # A class that wins nowhere in the orthant has no facet.
    w = np.array([[-1.0, 0.0], [0.0, 0.0]])
    assert F.class_facets(w, np.array([-1.0, 0.0]), 0).empty


def test_containment_holds_exactly_when_the_training_accuracy_is_100_percent():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centres = np.array([[4.0, 0, 0, 1], [0, 4.0, 0, 1], [0, 0, 4.0, 1]])
    y = np.repeat(np.arange(3), 30)
    f = np.maximum(centres[y] + 0.5 * rng.standard_normal((90, 4)), 0).astype(np.float32)
    clf = LogisticRegression(C=1e4, max_iter=5000).fit(f, y)
    w, b = clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
    c = F.containment(f, y, w, b)
    assert np.all(np.asarray(c.accuracy) == 1.0) and np.all(np.asarray(c.inside))
    # Every point of each hull (random convex combinations) is classified as its class.
    for k in range(3):
        combos = rng.dirichlet(np.ones(30), 500) @ f[y == k]
        assert np.all(np.argmax(combos @ w.T + b, 1) == k)
    # One training point of class 0 moved into class 1: class 0 loses its containment.
    f2 = f.copy()
    f2[0] = f[y == 1][0]
    c2 = F.containment(f2, y, w, b)
    assert float(c2.accuracy[0]) < 1.0 and not bool(c2.inside[0]) and float(c2.min_margin[0]) < 0
    assert np.all(np.asarray(c2.inside[1:]))
    np.testing.assert_array_equal(np.asarray(c2.inside), np.asarray(c2.accuracy) == 1.0)
    # ... visibly: that vertex of the class-0 hull is classified 1.
    assert np.argmax(f2[0] @ w.T + b) == 1


def _qp_reference(f, a, beta):
    """min ||z - f||^2 s.t. a.z = beta, z >= 0 by SLSQP (float64)."""
    res = minimize(
        lambda z: np.sum((z - f) ** 2),
        np.maximum(f, 0),
        jac=lambda z: 2 * (z - f),
        constraints=[{"type": "eq", "fun": lambda z: a @ z - beta, "jac": lambda z: a}],
        bounds=[(0, None)] * len(f),
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return np.sqrt(res.fun) if res.success else np.inf


def test_closest_boundary_point_against_closed_form_and_a_qp_solver():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    feats = np.maximum(rng.standard_normal((6, 6)), 0).astype(np.float32)
    free = jax.vmap(lambda f: F.closest_boundary_point(w, b, f, nonnegative=False))(feats)
    box = jax.vmap(lambda f: F.closest_boundary_point(w, b, f))(feats)
    loop = [F.closest_boundary_point(w, b, f) for f in feats]  # vmap == loop
    np.testing.assert_allclose([r.distance for r in loop], box.distance, **tol(np.float32, 4))
    for i, f in enumerate(feats.astype(np.float64)):
        logits = w @ f + b
        k = int(np.argmax(logits))
        a, beta = w[k] - w, b - b[k]
        others = [j for j in range(4) if j != k]
        closed = min((logits[k] - logits[j]) / np.linalg.norm(a[j]) for j in others)
        assert float(free.distance[i]) == pytest.approx(closed, rel=1e-4)
        qp = min(_qp_reference(f, a[j], beta[j]) for j in others)
        assert float(box.distance[i]) == pytest.approx(qp, rel=1e-4, abs=1e-5)
        assert float(box.distance[i]) >= float(free.distance[i]) - 1e-6  # a smaller set
        z = np.asarray(box.point[i], np.float64)
        top = np.sort(w @ z + b)[-2:]
        assert z.min() >= 0 and top[1] - top[0] <= 1e-4  # on the boundary, in the orthant
        assert int(box.label[i]) == k and int(box.adv_label[i]) in others
        assert F.STATUS_NAMES[int(box.status[i])] == "converged"
    # A class whose facet hyperplanes all miss the orthant: no boundary there.
    w2, b2 = np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([1.0, 0.0])
    res = F.closest_boundary_point(w2, b2, np.array([0.5, 0.5]))
    assert F.STATUS_NAMES[int(res.status)] == "no_boundary" and not bool(res.converged)
    assert F.closest_boundary_point(w2, b2, np.array([0.5, 0.5]), nonnegative=False).converged


# ------------------------------------------------------------------ reaching and morphing


def _linear_features(p, x):
    return p @ x.ravel()


def test_reach_features_reaches_what_can_be_reached():
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    x = jnp.full((2, 2, 1), 0.5)
    reachable = a @ jnp.asarray(rng.uniform(0.2, 0.8, 4), jnp.float32)
    unreachable = 50.0 * jnp.abs(a).sum(1)
    targets = jnp.stack([reachable, unreachable])
    many = jax.vmap(
        lambda t: F.reach_features(_linear_features, a, x, t, steps=400, learning_rate=0.05)
    )(targets)
    names = [F.STATUS_NAMES[int(s)] for s in many.status]
    assert names == ["converged", "not_reached"]
    assert float(many.error[0]) <= 0.05 < float(many.initial_error[0])
    assert float(many.error[1]) > 0.5 and bool(jnp.all((many.image >= 0) & (many.image <= 1)))
    one = F.reach_features(_linear_features, a, x, reachable, steps=400, learning_rate=0.05)
    np.testing.assert_allclose(one.image, many.image[0], **tol(np.float32, 16))
    with pytest.raises(ValueError, match="must return a vector like target"):
        F.reach_features(_linear_features, a, x, jnp.ones(5))


STEPS = 18  # 2 x 18 queries: the shape of the hull problems above


def test_morph_straight_path_crossing_is_exact_and_linear_features_do_not_bend(case):
    points, *_ = case
    d = points.shape[1]
    rng = np.random.default_rng(3)
    proj = jnp.asarray(rng.standard_normal((d, 4)), jnp.float32)
    x1, x2 = (jnp.asarray(rng.uniform(size=(2, 2, 1)), jnp.float32) for _ in range(2))
    # Class 0 on the side of phi(x1), class 1 on that of phi(x2): the boundary between them
    # bisects the straight path (t = 1/2); class 2 never wins near it.
    f1, f2 = _linear_features(proj, x1), _linear_features(proj, x2)
    diff, mid = f1 - f2, (f1 + f2) / 2
    w = jnp.stack([diff, -diff, 0.1 * jnp.asarray(rng.standard_normal(d), jnp.float32)])
    b = jnp.array([-(diff @ mid), diff @ mid, -10.0])
    lin = F.morph(_linear_features, proj, x1, x2, (w, b), points, steps=STEPS)
    np.testing.assert_allclose(lin.deviation, 0.0, atol=1e-5)
    np.testing.assert_array_equal(lin.labels, lin.straight_labels)
    assert int(lin.labels[0]) == 0 and int(lin.labels[-1]) == 1 and bool(lin.converged)
    tc = float(lin.straight_crossing)
    assert tc == pytest.approx(0.5, abs=1e-5)
    f = (1 - tc) * lin.features[0] + tc * lin.features[-1]
    assert float(jnp.min(F.class_polyhedron(w, b, 0).slack(f))) == pytest.approx(0.0, abs=1e-3)
    assert float(lin.crossing) == pytest.approx(9 / (STEPS - 1))  # the first grid t past 1/2
    # The hull fields: distances of both paths agree with hull_distance.
    both = jnp.concatenate([lin.features, lin.straight])
    np.testing.assert_allclose(
        np.concatenate([lin.hull_distance, lin.straight_hull_distance]),
        F.hull_distance(points, both).distance,
        **tol(np.float32, 4),
    )
    # A ReLU feature map whose units switch half way bends the path away from the straight one.
    bias = proj @ ((x1 + x2) / 2).ravel()
    relu = F.morph(
        lambda p, x: jax.nn.relu(p[0] @ x.ravel() - p[1]), (proj, bias), x1, x2, (w, b), steps=STEPS
    )
    assert float(jnp.max(relu.deviation)) > 1e-3
    assert bool(jnp.all(jnp.isnan(relu.hull_distance))) and not bool(jnp.any(relu.outside))


# ------------------------------------------------------------------ the probe


def test_features_probe_writes_every_number_behind_its_plots(tmp_path):
    config = tiny_config(
        {
            "probe": "features",
            "samples": 16,
            "max_train": 120,
            "pairs": 2,
            "steps": 5,
            "reach": 2,
            "reach_steps": 20,
            "batch_size": 32,
        },
        name="tiny-features",
    )
    suite.run(config, tmp_path, progress=False, log=lambda s: None)
    result = json.loads((tmp_path / "results" / "features.json").read_text())
    s = result["summary"]["m"]
    # Containment holds exactly for the classes classified without error.
    assert s["head_max_logit_error"] < 1e-4  # last_layer gives apply_fn's logits
    inside = s["containment"]["inside"]
    acc = s["containment"]["train_accuracy_per_class"]
    assert inside == [a == 1.0 for a in acc] and s["containment"]["matches_accuracy"]
    for space in ("pixel", "feature"):
        out = s["outside"][space]
        assert 0.0 <= out["overall"] <= 1.0 and len(out["per_class"]) == 10
    assert 0.0 <= s["boundary"]["inside_class_hull_fraction"] <= 1.0
    assert len(s["morph"]) == 2 and len(s["facets_per_class"]) == 10
    assert set(result["figures"]) == {"outside", "distances", "projection-m", "morph-m"}
    for name in result["figures"].values():
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    arrays = np.load(tmp_path / "results" / "features.npz")
    assert arrays["m/feature_outside"].shape == (16,)
    assert arrays["m/morph_hull_distance"].shape == (2, 5)
