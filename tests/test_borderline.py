"""Borderline instances (docs/borderline.md): the bisection, label changes, SVM linearity,
the baselines' pairings, DeepDIG's generators and three phases on digits, and the probe.

Hand-solvable cases: on an affine two-class classifier the gap p_s - p_t along a
segment is tanh of a linear function, so where the bisection stops and how many
halvings it needs are known; a three-class affine classifier with a middle region
(a third class on the segment, and a segment crossing two boundaries); a step
classifier the bisection can never settle on (the cap); features linearly
separable by construction.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config, tiny_model, tol

import bgeom.probes.borderline as probe_module
from bgeom import borderline as bl
from bgeom import suite, train
from bgeom.probes import base

SHAPE = (4, 4, 1)


def affine(params, x):
    W, b = params
    return W @ x.ravel() + b


def jump(threshold, x):
    """Class 0 right of the threshold, class 1 at and left of it: no tie anywhere."""
    return jnp.where(x.ravel()[0] > threshold, jnp.array([5.0, 0.0]), jnp.array([0.0, 5.0]))


def tanh_mlp(params, x):
    """Five classes, curved boundaries: W2 tanh(W1 x)."""
    return params[1] @ jnp.tanh(params[0] @ x.ravel())


def two_class(seed):
    rng = np.random.default_rng(seed)
    d = math.prod(SHAPE)
    return (
        jnp.asarray(rng.standard_normal((2, d)), jnp.float32),
        jnp.asarray(rng.standard_normal(2), jnp.float32),
    )


def delta(params, x):
    """F = f_0 - f_1 in float64."""
    W, b = (np.asarray(a, np.float64) for a in params)
    return (W[0] - W[1]) @ np.asarray(x, np.float64).reshape(-1) + b[0] - b[1]


def point_with(params, value, rng):
    """A random image x with F(x) = value (to float32 rounding)."""
    W, _ = (np.asarray(a, np.float64) for a in params)
    w = W[0] - W[1]
    x = rng.standard_normal(w.size)
    x = x + (value - delta(params, x)) * w / (w @ w)
    return x.reshape(SHAPE).astype(np.float32)


# ------------------------------------------------------------------ the bisection


@pytest.mark.parametrize("tolerance", [1e-2, 1e-4])
def test_affine_search_lands_on_the_hyperplane_within_the_predicted_halvings(tolerance):
    params = two_class(0)
    rng = np.random.default_rng(1)
    ends = [(0.5, -1.0), (3.0, -4.0), (7.0, -9.0), (1.0, -20.0), (12.0, -0.3)]
    a = np.stack([point_with(params, fa, rng) for fa, _ in ends])
    b = np.stack([point_with(params, fb, rng) for _, fb in ends])
    res = jax.jit(jax.vmap(lambda a, b: bl.borderline_search(affine, params, a, b, tol=tolerance)))(
        a, b
    )
    assert np.all(np.asarray(res.status) == bl.CONVERGED) and np.all(res.converged)
    assert np.all(np.asarray(res.source) == 0) and np.all(np.asarray(res.target) == 1)
    for i in range(len(ends)):
        fa, fb = delta(params, a[i]), delta(params, b[i])
        point = np.asarray(res.point[i], np.float64)
        # p_0 - p_1 = tanh(F / 2): |gap| < tol <=> |F| < 2 atanh(tol), i.e. the point is
        # within 2 atanh(tol) / ||w|| of the hyperplane F = 0 ...
        f = delta(params, point)
        assert abs(f) < 2 * math.atanh(tolerance) * (1 + 1e-3) + 1e-5
        assert float(res.gap[i]) == pytest.approx(abs(math.tanh(f / 2)), abs=1e-6)
        # ... on the segment: point = (1 - t) a + t b with t = F(a) / (F(a) - F(b)) + O(tol)
        t = (fa - f) / (fa - fb)
        np.testing.assert_allclose(point, (1 - t) * a[i] + t * b[i], **tol(np.float32, 10))
        # The k-th midpoint is within 2^-k of the crossing along t, so |F| <= |F(a) - F(b)| 2^-k:
        # at most floor(log2(|F(a) - F(b)| / (2 atanh tol))) + 1 halvings.
        predicted = math.floor(math.log2(abs(fa - fb) / (2 * math.atanh(tolerance)))) + 1
        assert 1 <= int(res.halvings[i]) <= predicted


def test_a_crossing_at_the_first_midpoint_takes_one_halving():
    params = two_class(2)
    rng = np.random.default_rng(3)
    a, b = point_with(params, 1.0, rng), point_with(params, -1.0, rng)
    res = bl.borderline_search(affine, params, a, b)
    assert bool(res.converged) and int(res.halvings) == 1
    np.testing.assert_allclose(res.point, (a + b) / 2, **tol(np.float32, 4))


def test_a_midpoint_in_a_third_class_fails_and_the_cap_is_honoured():
    # Three classes on a line: f0 = 4 x, f1 = -4 x, f2 = 1. The midpoint of
    # [(1, 0), (-1, 0)] is the origin, where class 2 leads.
    params = (jnp.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 0.0]]), jnp.array([0.0, 0.0, 1.0]))
    a, b = jnp.array([1.0, 0.0]).reshape(1, 2, 1), jnp.array([-1.0, 0.0]).reshape(1, 2, 1)
    res = bl.borderline_search(affine, params, a, b)
    assert bl.STATUS_NAMES[int(res.status)] == "third_class" and not bool(res.converged)
    assert int(res.halvings) == 1 and (int(res.source), int(res.target)) == (0, 1)
    np.testing.assert_array_equal(res.point, jnp.zeros((1, 2, 1)))
    # A step classifier: p_0 - p_1 = +-tanh(2.5) everywhere, so the gap never falls
    # below tol and the bracket shrinks to the jump; the reference would loop forever.
    threshold = jnp.float32(1 / 3)
    one, zero = jnp.ones((1, 1, 1)), jnp.zeros((1, 1, 1))
    for cap in (7, 60):
        res = bl.borderline_search(jump, threshold, one, zero, max_halvings=cap)
        assert bl.STATUS_NAMES[int(res.status)] == "max_halvings"
        assert int(res.halvings) == cap and not bool(res.converged)
        assert float(res.gap) == pytest.approx(math.tanh(2.5), rel=1e-5)
    assert abs(float(res.point.ravel()[0]) - 1 / 3) < 1e-6  # the bracket closed on the jump


def test_same_class_ends_and_nonfinite_logits_are_statuses():
    params = two_class(4)
    rng = np.random.default_rng(5)
    a, b = point_with(params, 2.0, rng), point_with(params, 5.0, rng)
    res = bl.borderline_search(affine, params, a, b)
    assert bl.STATUS_NAMES[int(res.status)] == "same_class" and int(res.halvings) == 0
    np.testing.assert_array_equal(res.point, a)

    def holed(params, x):  # NaN logits near the boundary F = 0
        logits = affine(params, x)
        return logits + jnp.where(jnp.abs(logits[0] - logits[1]) < 0.5, jnp.nan, 0.0)

    a, b = point_with(params, 2.0, rng), point_with(params, -2.0, rng)
    res = bl.borderline_search(holed, params, a, b)
    assert bl.STATUS_NAMES[int(res.status)] == "nonfinite" and int(res.halvings) == 1
    bad = a.copy()
    bad[0, 0, 0] = np.nan
    search = jax.jit(lambda a, b: bl.borderline_search(affine, params, a, b))
    assert bl.STATUS_NAMES[int(search(bad, b).status)] == "nonfinite"  # under jit: a status
    with pytest.raises(ValueError, match="NaN or Inf"):  # eager: refused
        bl.borderline_search(affine, params, bad, b)


def test_vmap_equals_a_loop_and_jit_equals_eager_and_the_chunked_map():
    rng = np.random.default_rng(3)
    params = tuple(
        jnp.asarray(rng.standard_normal(s) / 3, jnp.float32) for s in ((16, 16), (5, 16))
    )
    apply_fn = tanh_mlp
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    a = 3 * jax.random.normal(keys[0], (8, *SHAPE))
    b = 3 * jax.random.normal(keys[1], (8, *SHAPE))
    mapped = jax.jit(jax.vmap(lambda a, b: bl.borderline_search(apply_fn, params, a, b)))(a, b)
    assert len(set(np.asarray(mapped.status).tolist())) >= 2  # several outcomes are compared
    chunked = bl.borderline_searches(apply_fn, params, np.asarray(a), np.asarray(b))
    for i in range(len(a)):
        one = bl.borderline_search(apply_fn, params, a[i], b[i])
        for field in bl.BorderlineResult._fields:
            got, want = np.asarray(getattr(mapped, field))[i], np.asarray(getattr(one, field))
            np.testing.assert_allclose(got, want, **tol(np.float32), err_msg=field)
            np.testing.assert_allclose(
                np.asarray(getattr(chunked, field))[i], want, **tol(np.float32), err_msg=field
            )


def test_bad_input_is_refused_with_what_to_do():
    params = two_class(0)
    x = jnp.zeros(SHAPE)
    for bad in (0.0, -1e-4, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"tol must be a number in \(0, 1\]"):
            bl.borderline_search(affine, params, x, x + 1, tol=bad)
    with pytest.raises(ValueError, match="same shape"):
        bl.borderline_search(affine, params, x, jnp.zeros((2, 8, 1)))
    with pytest.raises(ValueError, match="ONE example"):
        bl.borderline_search(affine, params, jnp.zeros((3, *SHAPE)), jnp.zeros((3, *SHAPE)))
    with pytest.raises(ValueError, match="max_halvings must be >= 1"):
        bl.borderline_search(affine, params, x, x + 1, max_halvings=0)
    with pytest.raises(ValueError, match=r"target class 12 is out of range"):
        bl.check_class_pairs([(3, 12)], 10, "deepdig")
    with pytest.raises(ValueError, match=r"target class 2 is out of range .* \[0, 2\)"):
        bl.train_generators(affine, params, [np.zeros((4, *SHAPE))], [2])
    with pytest.raises(ValueError, match="two different classes"):
        bl.random_pairs(
            jax.random.PRNGKey(0), affine, params, np.zeros((2, *SHAPE)), np.zeros(2, int), 1, 1
        )
    with pytest.raises(ValueError, match="'S-T'"):
        probe_module.BorderlineOptions.from_spec({"pairs": ["3/8"]}, "probes[0] (borderline)")


# ------------------------------------------------------------------ complexity


def line3(params, x):
    """Three classes on a line: 0 for x < 0, 1 on (0, 0.5), 2 for x > 0.5."""
    v = x.ravel()[0]
    return jnp.stack([-4 * v, jnp.zeros_like(v), 4 * v - 2])


def test_label_changes_count_the_boundaries_a_segment_crosses():
    x = lambda v: jnp.full((1, 1, 1), v, jnp.float32)
    crossing = bl.label_changes(line3, None, x(1.0), x(-1.0))
    assert int(crossing.changes) == 2 and float(crossing.complexity) == pytest.approx(2 / 50)
    assert bool(crossing.converged)
    assert int(bl.label_changes(line3, None, x(0.1), x(0.4)).changes) == 0
    assert int(bl.label_changes(line3, None, x(0.1), x(0.9), num_points=8).changes) == 1
    # Two instances on either side: each one's single partner is the other.
    res = bl.input_complexity(jax.random.PRNGKey(0), line3, None, np.stack([x(-1.0), x(1.0)]))
    assert res.mean == pytest.approx(2 / 50) and len(res.complexity) == 2
    first, second = bl.complexity_pairs(jax.random.PRNGKey(1), 10, 3)
    assert np.array_equal(np.bincount(first), np.full(10, 3))
    for i in range(10):
        partners = second[first == i]
        assert len(set(partners)) == 3 and i not in partners
    assert bl.complexity_pairs(jax.random.PRNGKey(1), 1, 3)[0].size == 0


# ------------------------------------------------------------------ linearity and baselines


def test_linearity_of_features_separable_by_construction_is_perfect():
    rng = np.random.default_rng(0)
    d = math.prod(SHAPE)
    rotation = jnp.asarray(np.linalg.qr(rng.standard_normal((d, d)))[0], jnp.float32)
    features_fn = lambda p, x: p @ x.ravel()  # a rotation: separability is kept
    u = np.eye(d)[0]

    def images(sign, n):
        noise = rng.standard_normal((n, d)) * 0.3
        noise[:, 0] = 0  # the classes differ only along u, by 2
        return (sign * u + noise).reshape(n, *SHAPE).astype(np.float32)

    feats = lambda x: bl.features(features_fn, rotation, x)
    res = bl.embedding_linearity(
        feats(images(-1, 40)),
        feats(images(1, 40)),
        {
            "test": (
                feats(np.concatenate([images(-1, 20), images(1, 20)])),
                np.r_[[3] * 20, [8] * 20],
            ),
            "borderline": (feats(images(0, 20)), np.full(20, 3)),
        },
        source=3,
        target=8,
    )
    assert res.accuracy["train"] == 1.0 and res.accuracy["test"] == 1.0 and res.converged
    d_test = res.signed["test"]
    assert np.all(d_test[:20] < 0) and np.all(d_test[20:] > 0)  # d > 0 on the target side
    m = float(np.mean(np.abs(d_test)))
    assert res.distance["test"] == pytest.approx(m / (1 + m))
    assert res.distance["borderline"] < res.distance["test"] / 3


def half_planes(params, x):
    """Class 0 where x_0 > 0, class 1 elsewhere."""
    return jnp.stack([x.ravel()[0], -x.ravel()[0]])


def test_epbs_pairs_each_source_image_with_its_nearest_target_and_rpbs_pairs_at_random():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 1, 2, 1)).astype(np.float32)
    y = (x[:, 0, 0, 0] <= 0).astype(int)
    y[:3] = 1 - y[:3]  # three images the model gets wrong: never paired
    flat = lambda p, x: x.ravel()
    ep = bl.embedding_nearest_pairs(half_planes, flat, None, x, y, 0, 1)
    labels = np.where(x[:, 0, 0, 0] > 0, 0, 1)
    correct_t = np.flatnonzero((y == 1) & (labels == 1))
    assert set(ep.first) == set(np.flatnonzero((y == 0) & (labels == 0)))
    for i, j in zip(ep.first, ep.second, strict=True):
        dist = np.linalg.norm(x[correct_t].reshape(len(correct_t), -1) - x[i].ravel(), axis=1)
        assert j == correct_t[np.argmin(dist)]
    assert len(set(ep.second)) > 1  # not every source image with one target image
    np.testing.assert_array_equal(ep.a, x[ep.first])
    np.testing.assert_array_equal(ep.b, x[ep.second])
    rp = bl.random_pairs(jax.random.PRNGKey(0), half_planes, None, x, y, 0, 1)
    assert len(rp.first) == min(len(ep.first), len(correct_t))
    assert set(rp.first) <= set(ep.first) and set(rp.second) <= set(correct_t)


# ------------------------------------------------------------------ generators and DeepDIG


def test_generator_loss_is_deepdig_loss_by_hand():
    rng = np.random.default_rng(0)
    shape, pairs, size, alpha = (2, 2, 1), 2, 3, 0.8
    cls = (jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), jnp.zeros(3))
    config = bl.GeneratorConfig(hidden=(5,))
    modules = [bl.make_generator(config, shape, s) for s in range(pairs)]
    graphdef = nnx.split(modules[0])[0]
    gparams = train.stack([nnx.split(m)[1] for m in modules])
    images = jnp.asarray(rng.uniform(size=(pairs, 4, *shape)), jnp.float32)
    targets = jnp.array([2, 0])
    rows = jnp.array([[0, 3], [1, 1], [2, 0]])  # (size, pairs)
    state = {"classifier": cls, "images": images, "targets": targets}
    loss, aux = jax.jit(bl.generator_loss(graphdef, affine, alpha))(
        gparams, state, {"row": rows}, jax.random.PRNGKey(0)
    )
    expected = []
    for p in range(pairs):
        x = np.asarray(images[p][rows[:, p]], np.float64)
        z = np.asarray(modules[p].logits(jnp.asarray(x, jnp.float32)), np.float64)
        g = 1 / (1 + np.exp(-z))
        recon = -np.mean(x * np.log(g) + (1 - x) * np.log(1 - g))
        logits = g.reshape(size, -1) @ np.asarray(cls[0], np.float64).T
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        onehot = np.eye(3)[int(targets[p])]
        attack = -np.mean(onehot * np.log(prob) + (1 - onehot) * np.log(1 - prob))
        expected.append(recon + alpha * attack)
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-5)
    assert set(aux.metrics) == {"reconstruction", "attack", "target_rate"}


def test_generators_for_small_and_large_images():
    config = bl.GeneratorConfig()
    assert bl.resolve_architecture("auto", (8, 8, 1)) == "dense"
    assert bl.resolve_architecture("auto", (28, 28, 1)) == "dense"
    assert bl.resolve_architecture("auto", (32, 32, 3)) == "conv"
    shape = (9, 9, 2)  # 9 -> 5 -> 10: cropped back to 9
    g = bl.make_generator(dataclasses.replace(config, architecture="conv", hidden=(2,)), shape, 0)
    assert isinstance(g, bl.ConvGenerator)
    out = g(jnp.full((2, *shape), 0.5))
    assert out.shape == (2, *shape) and bool(jnp.all((out >= 0) & (out <= 1)))
    assert isinstance(bl.make_generator(config, (2, 2, 1), 0), bl.DenseGenerator)
    with pytest.raises(ValueError, match="architecture must be one of"):
        bl.GeneratorConfig(architecture="gan")


# ------------------------------------------------------------------ DeepDIG on digits; the probe
#
# One suite run (an MLP on the digits, the probe on the pair 3-8) serves every test
# below: the probe's output, and DeepDIG called directly, which finds the probe's
# generators in their checkpoints and trains nothing.

PROBE = {
    "probe": "borderline",
    "pairs": ["3-8"],
    "steps": 40,
    "batch_size": 32,
    "partners": 3,
    "points": 10,
    "geometry_samples": 4,
    "k": 2,
    "examples": 2,
}
CONFIG = tiny_config(
    PROBE,
    name="tiny-borderline",
    datasets={"d": {"name": "digits"}},
    models={"m": tiny_model(options={"hidden": [64]}, train={"epochs": 15})},
)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("borderline")
    suite.run(CONFIG, out, progress=False, log=lambda s: None)
    ctx = base.SuiteContext(suite.validate_config(CONFIG), out, progress=False)
    return out, ctx


def test_borderline_probe_writes_every_number_behind_its_plots(digits_run):
    out, _ = digits_run
    result = json.loads((out / "results" / "borderline.json").read_text())
    summary = result["summary"]
    rows = {
        "m/3->8",
        "m/8->3",
        "m/3-8 RPBS",
        "m/3-8 EPBS",
        "m/3-8 train images",
        "m/3-8 test images",
    }
    assert set(summary) == rows
    arrays = np.load(out / "results" / "borderline.npz")
    bars = summary["m/3-8 test images"]["bars"]
    for label, row, bar in (
        ("3->8", "m/3->8", "DeepDIG S->T"),
        ("8->3", "m/8->3", "DeepDIG T->S"),
        ("RPBS", "m/3-8 RPBS", "RPBS"),
        ("EPBS", "m/3-8 EPBS", "EPBS"),
    ):
        s = summary[row]
        status = arrays[f"m/3-8/{label}/status"]
        assert s["searched"] == len(status) > 0
        assert s["instances"] == int(arrays[f"m/3-8/{label}/converged"].sum()) > 1
        assert s["success_rate"] == pytest.approx(np.mean(status == bl.CONVERGED))
        assert s["attempts"] == pytest.approx(np.mean(arrays[f"m/3-8/{label}/halvings"]))
        mean = np.mean(arrays[f"m/3-8/{label}/complexity"])
        assert bars["complexity"][bar] == pytest.approx(mean) == s["complexity"]
        assert bars["distance"][bar] == s["svm_distance"]
        signed = summary["m/3-8 test images"]["signed_distances"][label]
        np.testing.assert_allclose(signed, arrays[f"m/3-8/signed_distance/{label}"])
        assert len(signed) == s["instances"]
        m = np.mean(np.abs(signed))
        assert s["svm_distance"] == pytest.approx(m / (1 + m))
        assert s["curvature_points"] <= 4 and s["boundary_distance_median"] < 1e-2
    assert summary["m/3->8"]["phase1_train_yield"] > 0.5
    assert summary["m/3-8 train images"]["svm_accuracy"] > 0.9
    natural = summary["m/3-8 test images"]
    assert natural["curvature_operator"] == "fd" and natural["fd_scale"] > 0
    assert natural["boundary_distance_median"] > 10 * summary["m/3->8"]["boundary_distance_median"]
    assert set(result["figures"]) == {"instances-m", "characteristics-m", "svm-m"}
    for name in result["figures"].values():
        assert (out / "plots" / name).stat().st_size > 1000


def test_deepdig_on_digits_trains_yields_and_reuses_its_checkpoints(digits_run):
    out, ctx = digits_run
    folder = out / "models" / "m" / "deepdig" / "m"
    assert sorted(f.name.split("-")[0] for f in folder.iterdir()) == ["phase1", "phase2"]
    member = ctx.members("m")[0]
    x_train, y_train = ctx.train_inputs("m")
    x_test, y_test = ctx.test_inputs("m")
    opts = probe_module.BorderlineOptions.from_spec(
        {k: v for k, v in PROBE.items() if k != "probe"}, ""
    )
    res = bl.deepdig(
        member.apply_fn,
        member.params,
        x_train,
        y_train,
        x_test,
        y_test,
        [(3, 8), (8, 3)],
        config=probe_module._config(opts),
        checkpoint_dir=folder,
    )
    assert len(list(folder.iterdir())) == 2  # the probe's generators, loaded: nothing new
    for generators in (res.phase1, res.phase2):
        loss = generators.history["loss"]
        assert len(loss) == 10 and loss[-1] < loss[0]  # 40 steps: 10 checkpointed epochs of 4
        assert generators.steps == 40 and generators.architecture == "dense"
    labels = lambda x: bl.predict(member.apply_fn, member.params, x)
    arrays = np.load(out / "results" / "borderline.npz")
    for p in res.pairs:
        assert p.phase1_train_yield > 0 and p.phase1_test_yield > 0 and p.phase2_yield > 0
        assert np.all(labels(p.adversarial) == p.target) and np.all(labels(p.reflected) == p.source)
        ok = p.search.converged
        assert ok.any() and np.all(p.search.gap[ok] < 1e-4)
        assert set(labels(p.instances)) <= {p.source, p.target}
        np.testing.assert_array_equal(p.search.point, arrays[f"m/3-8/{p.source}->{p.target}/point"])
    with pytest.raises(ValueError, match=r"target class 10 is out of range"):
        bl.deepdig(member.apply_fn, member.params, x_train, y_train, x_test, y_test, [(3, 10)])
    spec = {**suite.validate_config(CONFIG)["probes"][0], "pairs": ["3-8", "9-12"]}
    with pytest.raises(ValueError, match=r"class 12 is out of range .* \[0, 10\)"):
        base.PROBES["borderline"].run(ctx, spec)
    assert len(list(folder.iterdir())) == 2  # refused before anything was trained
