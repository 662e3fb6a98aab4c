"""PRIME (bgeom.augment): the primitives, their mixture, the JSD loss, the training transform,
and the robustness probe on digits (PRIME-trained vs standard models)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config, tol

import bgeom.probes.robustness as robustness
from bgeom import augment as A
from bgeom import data, suite

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def images(digits):
    """Four digits (8x8x1) and two colour images of another size (7x10x3)."""
    rng = np.random.default_rng(0)
    return digits.x_test[:4], rng.uniform(size=(2, 7, 10, 3)).astype(np.float32)


# Smaller PRIME options for the checks that compile prime again: the same code paths
# (all primitives, chains, switch, mixing) in a smaller program.
SMALL = dict(width=2, max_depth=2)
PRIME_SMALL = jax.jit(lambda k, x: A.prime(k, x, **SMALL))
# The primitives with their strength as an argument (0: the identity).
STRENGTH = {
    "spectral": lambda k, x, s: A.spectral_filter(k, x, sigma=s),
    "spatial": lambda k, x, s: A.diffeomorphism(k, x, temperature=s),
    "color": lambda k, x, s: A.smooth_color(k, x, temperature=s),
}
TYPICAL = {"spectral": 2.0, "spatial": 0.01, "color": 0.01}


# ------------------------------------------------------------------ the primitives


def test_outputs_stay_in_range_with_the_input_shape_and_keys_decide(images):
    # The robustness probe's figure function: each primitive and three PRIME draws, jitted
    # (a probe run on digits reuses this compilation).
    x = images[0][0]
    panels = lambda k: np.concatenate(robustness._primitive_panels(k, jnp.asarray(x), 3))
    out = panels(KEY)  # spectral, spatial, color, prime x 3
    assert out.shape == (6, *x.shape) and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, panels(KEY))
    assert np.all(np.abs(panels(jax.random.PRNGKey(1)) - out).max(axis=(1, 2, 3)) > 1e-4)
    assert np.all(np.abs(out - x).max(axis=(1, 2, 3)) > 1e-4)


def test_colour_images_of_any_size_jit_eager_vmap_loop_and_zero_strength(images):
    """On 7x10x3 images: the primitives and PRIME stay in [0, 1] with the input's shape,
    the primitives give the same image under jit as eagerly, PRIME the same under vmap as
    in a loop (its loops run compiled even in an eager call); zero strength and m = 0
    return the image."""
    x = images[1]
    keys = jax.random.split(KEY, len(x))
    for name, raw in STRENGTH.items():
        fn = jax.jit(raw)
        y = fn(keys[0], x[0], TYPICAL[name])
        assert y.shape == x[0].shape and y.min() >= 0 and y.max() <= 1, name
        assert np.abs(y - x[0]).max() > 1e-3, name
        np.testing.assert_allclose(y, raw(keys[0], x[0], TYPICAL[name]), **tol(np.float32, 4))
        np.testing.assert_array_equal(fn(keys[0], x[0], 0.0), x[0], err_msg=name)
    looped = np.stack([PRIME_SMALL(k, xi) for k, xi in zip(keys, x, strict=True)])
    assert looped.shape == x.shape and looped.min() >= 0 and looped.max() <= 1
    batched = jax.jit(jax.vmap(lambda k, xi: A.prime(k, xi, **SMALL)))(keys, x)
    np.testing.assert_allclose(batched, looped, **tol(np.float32, 4))
    tiny = dict(width=1, max_depth=1, primitives=("spectral",))
    np.testing.assert_array_equal(A.prime(KEY, x[0], m=0.0, **tiny), x[0])
    # The reference's off-centre delta (index ceil(3 / 2) = 2) shifts by one pixel.
    shifted = np.asarray(A.spectral_filter(KEY, x[0], sigma=0.0, centred=False))
    np.testing.assert_array_equal(shifted[:-1, :-1], x[0][1:, 1:])
    assert np.all(shifted[-1] == 0) and np.all(shifted[:, -1] == 0)


def test_jit_over_a_closed_over_image(images):
    """jax.jit(lambda k: prime(k, x)) with a concrete x captured: the range check reads x
    with NumPy (a jnp reduction of it would be a tracer under jit and fail)."""
    from bgeom import corruptions

    x = jnp.asarray(images[0][0])
    keys = jax.random.split(KEY, 2)
    tiny = dict(width=1, max_depth=1, primitives=("spectral",))
    closed = jax.jit(jax.vmap(lambda k: A.prime(k, x, **tiny)))(keys)
    passed = jax.jit(jax.vmap(lambda k, xi: A.prime(k, xi, **tiny), in_axes=(0, None)))(keys, x)
    np.testing.assert_allclose(closed, passed, **tol(np.float32, 4))
    noisy = jax.jit(lambda k: corruptions.apply(k, x, "gaussian_noise", 2))(KEY)
    np.testing.assert_allclose(noisy, corruptions.apply(KEY, x, "gaussian_noise", 2), atol=1e-6)


def test_colour_map_is_a_sine_series_of_the_intensity():
    from bgeom.augment import _sine_series

    rng = np.random.default_rng(1)
    x = rng.uniform(size=(5, 6, 2)).astype(np.float32)
    beta = rng.standard_normal((2, 30)).astype(np.float32)
    k = np.arange(1, 31)
    want = np.einsum("hwck,ck->hwc", np.sin(np.pi * x[..., None].astype(np.float64) * k), beta)
    np.testing.assert_allclose(_sine_series(jnp.asarray(beta), jnp.asarray(x)), want, atol=1e-4)
    # cut = 1: x' - x = sqrt(T) beta_1 sin(pi x), one beta per channel (no pixel clipped here)
    y = rng.uniform(0.3, 0.7, size=(6, 6, 2)).astype(np.float32)
    shift = (np.asarray(A.smooth_color(KEY, y, cut=1, temperature=1e-4)) - y) / np.sin(np.pi * y)
    assert np.ptp(shift[..., 0]) < 1e-4 and np.ptp(shift[..., 1]) < 1e-4
    assert abs(shift[0, 0, 0] - shift[0, 0, 1]) > 1e-4


def test_diffeomorphism_draws_the_aliased_field_with_the_right_covariance():
    """The field drawn on the pixel grid has the covariance of the full sum over modes
    i, j <= max_cut (aliased modes summed), for a cut above the grid's resolution."""
    from bgeom.augment import _field_basis

    h, w, modes, cut = 6, 7, 25, 18
    std, s_y, s_x = (np.asarray(a, np.float64) for a in _field_basis(h, w, float(cut), modes))
    phi = np.einsum("ya,xb->yxab", s_y, s_x).reshape(h * w, -1) * std.reshape(-1)
    aliased = phi @ phi.T
    k = np.arange(1, modes + 1)
    r = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)  # (j: y-mode, i: x-mode)
    e = np.where(r < cut + 0.5, 1 / r, 0.0)
    sy = np.sin(np.pi * np.linspace(0, 1, h)[:, None] * k)
    sx = np.sin(np.pi * np.linspace(0, 1, w)[:, None] * k)
    full = np.einsum("yj,xi,ji->yxji", sy, sx, e).reshape(h * w, -1)
    np.testing.assert_allclose(aliased, full @ full.T, atol=1e-4)
    t1, t2 = A.diffeomorphism_temperatures(32, 2)
    np.testing.assert_allclose(t1, 1 / (np.pi * 32**2 * np.log(2)), rtol=1e-5)
    np.testing.assert_allclose(t2, 4 / (np.pi**3 * 4 * np.log(2)), rtol=1e-5)


# ------------------------------------------------------------------ JSD and the transform


def test_jsd_consistency_against_a_hand_computation():
    z = jnp.asarray([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    assert float(A.jsd_consistency(z, z, z)) == pytest.approx(0.0, abs=1e-7)
    a, b, c = z, z[:, ::-1], jnp.zeros_like(z)
    p = [np.asarray(jax.nn.softmax(v), np.float64) for v in (a, b, c)]
    mix = np.clip(sum(p) / 3, 1e-7, 1)
    kl = [np.sum(q * (np.log(q) - np.log(mix)), axis=1).mean() for q in p]
    assert float(A.jsd_consistency(a, b, c)) == pytest.approx(sum(kl) / 3, rel=1e-5)


def test_prime_transform_maps_prime_over_the_batch_and_adds_the_jsd_loss(images):
    plain = A.get("prime")
    assert isinstance(plain, A.PRIME) and not plain.jsd and plain.primitives == tuple(A.PRIMITIVES)
    x = jnp.asarray(images[1])
    assert plain.describe()["name"] == "prime" and plain.inputs(x) is x
    jsd = A.get({"name": "prime", "jsd": True, **SMALL})
    assert jsd.jsd and jsd.width == 2
    # Two ensemble members (the training step vmaps the transform over them), each with
    # its own key and batch: [x, prime(x), prime(x)], one key per image.
    member_keys = jax.random.split(KEY, 2)
    xs, y = jnp.stack([x, x[::-1]]), jnp.arange(len(x))
    out, ys = jax.jit(jax.vmap(lambda k, xb: jsd(k, xb, y, None)))(member_keys, xs)
    n = len(x)
    assert out.shape == (2, 3 * n, *x.shape[1:]) and (ys == y).all()
    for member, k in enumerate(member_keys):
        np.testing.assert_array_equal(out[member, :n], xs[member])
        for copy, kc in enumerate(jax.random.split(k)):
            keys = jax.random.split(kc, n)
            looped = np.stack(
                [PRIME_SMALL(kk, xi) for kk, xi in zip(keys, xs[member], strict=True)]
            )
            got = out[member, (copy + 1) * n : (copy + 2) * n]
            np.testing.assert_allclose(got, looped, **tol(np.float32, 4))
    logits = jax.random.normal(KEY, (3 * n, 10))
    loss, metrics = jsd.loss(logits, y)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:n], y).mean()
    consistency = A.jsd_consistency(logits[:n], logits[n : 2 * n], logits[2 * n :])
    assert float(loss) == pytest.approx(float(ce + 12.0 * consistency), rel=1e-6)
    assert set(metrics) == {"train_accuracy", "consistency"}
    loss, metrics = plain.loss(logits[:n], y)  # without jsd: the plain cross-entropy
    assert float(loss) == pytest.approx(float(ce), rel=1e-6) and set(metrics) == {"train_accuracy"}


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: A.prime(KEY, np.zeros((2, 8, 8, 1))), "It looks like a batch"),
        (lambda: A.prime(KEY, np.zeros((8, 8))), r"shape \(H, W, C\)"),
        (lambda: A.prime(KEY, np.full((4, 4, 1), 1.5)), r"values in \[0, 1\]"),
        (lambda: A.prime(KEY, np.zeros((4, 4, 1)), widht=2), r"unknown option\(s\) \['widht'\]"),
        (lambda: A.prime(KEY, np.zeros((4, 4, 1)), primitives=("blur",)), "spectral, spatial"),
        (lambda: A.prime(KEY, np.zeros((4, 4, 1)), max_cut=2), "max_cut must be >= 3"),
        (
            lambda: A.spectral_filter(KEY, np.zeros((4, 4, 1)), kernel_size=1, centred=False),
            "needs kernel_size >= 2",
        ),  # fmt: skip
        (lambda: A.smooth_color(KEY, np.zeros((4, 4, 1)), cut=200), r"cut must be in \[1,"),
        (lambda: A.get({"name": "prime", "sigma": 1}), r"unknown option\(s\) \['sigma'\]"),
    ],
)
def test_bad_input_says_what_to_do(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------ the probe on digits


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A standard and a PRIME-trained MLP (default recipe) on all digits, and the robustness
    probe on the first 200 test images."""
    out = tmp_path_factory.mktemp("robustness")
    model = {"dataset": "d", "model": "mlp"}
    config = tiny_config(
        {"probe": "robustness", "samples": 200, "margin_samples": 4, "baseline": "standard"},
        datasets={"d": {"name": "digits"}},
        models={"standard": model, "prime": {**model, "augment": {"name": "prime"}}},
    )
    suite.run(config, out, progress=False, log=lambda m: None)
    return out, json.loads((out / "results" / "robustness.json").read_text())


def test_prime_model_is_at_least_as_robust_as_the_standard_one(probe_run):
    _, result = probe_run
    std, prime = result["summary"]["standard"], result["summary"]["prime"]
    print(
        f"\nclean / mean corruption accuracy: standard {std['clean_accuracy']:.3f} / "
        f"{std['mean_corruption_accuracy']:.3f}, PRIME {prime['clean_accuracy']:.3f} / "
        f"{prime['mean_corruption_accuracy']:.3f}, mCE {prime['mce']:.1f}"
    )
    assert prime["mean_corruption_accuracy"] >= std["mean_corruption_accuracy"]
    assert std["mce"] == pytest.approx(100.0) and std["relative_mce"] == pytest.approx(100.0)
    assert prime["mce"] < 100.0


def test_probe_writes_every_number_behind_its_plots(probe_run):
    out, result = probe_run
    summary = result["summary"]
    assert summary["baseline"] == "standard"
    arrays = np.load(out / "results" / "robustness.npz")
    for name in ("standard", "prime"):
        entry = summary[name]
        names = entry["corruptions"]
        assert (
            "saturate" not in names and len(names) == 13 and entry["severities"] == [1, 2, 3, 4, 5]
        )
        table = arrays[f"{name}/accuracy"]
        assert table.shape == (13, 5) and np.all((table >= 0) & (table <= 1))
        assert entry["mean_corruption_accuracy"] == pytest.approx(table.mean())
        assert entry["accuracy"][names[0]] == pytest.approx(table[0].tolist())
        assert float(arrays[f"{name}/clean_accuracy"]) == entry["clean_accuracy"]
        assert arrays[f"{name}/margin"].shape == (1, 4, 7)
        assert len(entry["dct_margins"]["median"]) == 7
    assert any("saturate skipped" in n for n in result["notes"])
    assert set(result["figures"]) == {"heatmap", "bars", "primitives", "corruptions", "margins"}
    for png in result["figures"].values():
        assert (out / "plots" / png).stat().st_size > 0


def test_corruption_errors_against_a_hand_computation():
    base = np.array([[0.9, 0.8], [0.5, 0.5]])  # errors 0.1 0.2 | 0.5 0.5, clean error 0.05
    model = np.array([[0.95, 0.9], [0.7, 0.6]])  # errors 0.05 0.1 | 0.3 0.4, clean error 0.0
    got = robustness.corruption_errors(model, 1.0, base, 0.95)
    assert got["ce"] == pytest.approx([100 * 0.15 / 0.3, 100 * 0.7 / 1.0])
    assert got["relative_ce"] == pytest.approx([100 * 0.15 / 0.2, 100 * 0.7 / 0.9])
    assert got["mce"] == pytest.approx((50.0 + 70.0) / 2)
    none = robustness.corruption_errors(model, 1.0, np.ones((2, 2)), 1.0)
    assert none["ce"] == [None, None] and none["mce"] is None


def test_bad_probe_options():
    config = tiny_config({"probe": "robustness", "corruptions": ["fog"]})
    with pytest.raises(ValueError, match=r"corruptions must be a non-empty list, each element"):
        suite.validate_config(config)
    config = tiny_config({"probe": "robustness", "severities": [0]})
    with pytest.raises(ValueError, match=r"severities must be a non-empty list"):
        suite.validate_config(config)


def test_probe_evaluates_a_prepared_tfds_benchmark(tmp_path):
    """benchmark = cifar10_corrupted: every corruption of the benchmark at the chosen
    severities, read through tfds (mock data here), for a model of the clean dataset."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from helpers import tiny_model

    probe = {"probe": "robustness", "benchmark": "cifar10_corrupted", "severities": [1, 3],
             "samples": 4, "margin_samples": 0}  # fmt: skip
    config = tiny_config(
        probe,
        datasets={"c": {"name": "cifar10", "max_train": 16, "max_test": 8}},
        models={"m": tiny_model("c", train={"epochs": 1, "batch_size": 8})},
    )
    with tfds.testing.mock_data(num_examples=8):
        suite.run(config, tmp_path / "run", progress=False, log=lambda m: None)
        configs = data.corruption_configs("cifar10_corrupted")
        fog = data.load("cifar10_corrupted/fog_3", max_test=4)
    result = json.loads((tmp_path / "run" / "results" / "robustness.json").read_text())
    entry = result["summary"]["m"]
    assert entry["corruptions"] == list(configs) and len(configs) == 19
    assert "fog" in configs and configs["fog"] == tuple(f"fog_{s}" for s in range(1, 6))
    assert entry["severities"] == [1, 3]
    table = np.load(tmp_path / "run" / "results" / "robustness.npz")["m/accuracy"]
    assert table.shape == (19, 2)
    assert np.all(np.isin(table, [0.0, 0.25, 0.5, 0.75, 1.0]))  # 4 images per config
    assert fog.x_test.shape == (4, 32, 32, 3)
    assert any("prepared cifar10_corrupted" in n for n in result["notes"])
    assert len(data.corruption_configs("mnist_corrupted")) == 15


def test_benchmark_images_of_another_shape_say_what_to_do(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tiny_config({"probe": "robustness", "benchmark": "cifar10_corrupted",
                          "samples": 4, "margin_samples": 0})  # fmt: skip
    with tfds.testing.mock_data(num_examples=8):
        with pytest.raises(ValueError, match=r"models trained on the benchmark's clean dataset"):
            suite.run(config, tmp_path / "run", progress=False, log=lambda m: None)
