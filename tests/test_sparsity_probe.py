"""The suite probe "sparsity" (docs/sparsefool.md): SparseFool against DeepFool on a tiny
suite, every number behind its plots written, the options passed on, bad options refused."""

import json
import re

import jax
import numpy as np
import pytest
from helpers import tiny_config, tiny_dataset, tiny_model

import bgeom
import bgeom.probes.sparsity  # noqa: F401  (registers the probe)
from bgeom import sparse, suite
from bgeom.margins import STATUS_NAMES as DEEPFOOL_STATUS_NAMES
from bgeom.probes import base

SAMPLES = 16
# A small digits MLP trained long enough to classify (most of) its test images.
CONFIG = tiny_config(
    {"probe": "sparsity", "samples": SAMPLES, "examples": 2, "batch_size": 8},
    name="tiny-sparsity",
    datasets={"d": tiny_dataset(max_test=SAMPLES)},
    models={"m": tiny_model(options={"hidden": [32]}, train={"epochs": 20, "batch_size": 32})},
)


class _Stop(Exception):
    pass


class RecordingContext(base.SuiteContext):
    """A suite context that records the options of ``ctx.batched`` and stops the probe there."""

    def batched(self, fn, member, *rows, **options):
        self.recorded = (fn, options)
        raise _Stop


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparsity")
    suite.run(CONFIG, out, progress=False, log=lambda s: None)
    return out


def _load(out, probe_id):
    result = json.loads((out / "results" / f"{probe_id}.json").read_text())
    return result, np.load(out / "results" / f"{probe_id}.npz")


def test_sparsity_probe_writes_every_number_behind_its_plots(run):
    result, arrays = _load(run, "sparsity")
    s = result["summary"]["m"]
    fooled = arrays["m/converged"]
    pixels_changed, label = arrays["m/pixels_changed"], arrays["m/label"]
    assert fooled.shape == pixels_changed.shape == (SAMPLES,) and s["samples"] == SAMPLES
    assert s["pixels"] == 64
    # SparseFool fools (almost) every image with fewer pixels than DeepFool changes.
    assert s["fooling_rate"] >= 0.9
    assert s["fooling_rate"] == pytest.approx(fooled.mean())
    assert s["median_pixels_changed"] < s["deepfool_median_pixels_changed"]
    assert s["median_pixels_changed"] == pytest.approx(np.median(pixels_changed[fooled]))
    assert s["pixels_changed_quartiles"] == pytest.approx(
        np.quantile(pixels_changed[fooled], [0.25, 0.75])
    )
    assert s["median_iterations"] == pytest.approx(np.median(arrays["m/iterations"]))
    assert s["max_iterations"] == int(arrays["m/iterations"].max()) <= 20
    # The perturbations behind the numbers: inside [0, 1], with their pixel counts and norms.
    x = np.asarray(bgeom.data.load("digits", max_train=300, max_test=SAMPLES).x_test)
    r = arrays["m/perturbation"]
    assert r.shape == x.shape
    assert np.all(x + r >= -1e-6) and np.all(x + r <= 1 + 1e-6)
    np.testing.assert_allclose(pixels_changed, np.mean(r[..., 0] != 0, axis=(1, 2)))
    np.testing.assert_allclose(arrays["m/l2"], np.linalg.norm(r.reshape(SAMPLES, -1), axis=1))
    assert s["median_l2"] == pytest.approx(np.median(arrays["m/l2"][fooled]))
    counts = s["status_counts"]
    assert list(counts) == list(sparse.STATUS_NAMES) and sum(counts.values()) == SAMPLES
    assert counts["converged"] == int(fooled.sum())
    # DeepFool on the same images.
    df_ok = arrays["m/deepfool/converged"]
    df_pixels, df_l2 = arrays["m/deepfool/pixels_changed"], arrays["m/deepfool/l2"]
    assert s["deepfool_fooling_rate"] == pytest.approx(df_ok.mean())
    assert s["deepfool_median_pixels_changed"] == pytest.approx(np.median(df_pixels[df_ok]))
    assert s["deepfool_median_l2"] == pytest.approx(np.median(df_l2[df_ok]))
    both = fooled & df_ok
    ratio = arrays["m/l2"][both] / df_l2[both]
    assert s["median_l2_ratio"] == pytest.approx(np.median(ratio)) and s["median_l2_ratio"] > 1
    assert list(s["deepfool_status_counts"]) == list(DEEPFOOL_STATUS_NAMES)
    np.testing.assert_array_equal(arrays["m/deepfool/label"], label)
    # The per-class maps: how often each pixel changed over each class's fooled images.
    maps, images = arrays["m/pixel_map"], arrays["m/pixel_map_images"]
    assert maps.shape == (10, 8, 8) and images.sum() == fooled.sum()
    for c in range(10):
        rows = fooled & (label == c)
        assert images[c] == rows.sum()
        if rows.any():
            np.testing.assert_allclose(maps[c], np.mean(r[rows][..., 0] != 0, axis=0))
            assert s["per_class"][str(c)]["images"] == rows.sum()
        else:
            assert np.isnan(maps[c]).all() and str(c) not in s["per_class"]
    pick = arrays["m/example_index"]
    assert len(pick) == 2 and fooled[pick].all()
    assert set(result["figures"]) == {"examples-m", "pixel_maps", "l0_l2"}
    for name in result["figures"].values():
        assert (run / "plots" / name).stat().st_size > 1000
    json.dumps(result, allow_nan=False)


def test_sparsity_probe_runs_sparsefool_with_its_options(run):
    _, arrays = _load(run, "sparsity")
    # With the default options the probe's SparseFool is bgeom.sparsefool's defaults on the
    # model's own test images.
    config = suite.validate_config(CONFIG)
    ctx = base.SuiteContext(config, run, progress=False)
    member = ctx.members("m")[0]
    x, _ = ctx.test_inputs("m", 4)
    ref = jax.jit(jax.vmap(lambda xi: bgeom.sparsefool(member.apply_fn, member.params, xi)))(x)
    np.testing.assert_array_equal(arrays["m/adv_label"][:4], np.asarray(ref.adv_label))
    np.testing.assert_allclose(
        arrays["m/perturbation"][:4], np.asarray(ref.perturbation), atol=1e-5
    )
    # Every option reaches bgeom.sparsefool; delta 1 (the whole [0, 1] range) is no limit.
    spec = dict(config["probes"][0])
    for delta, expected in ((1.0, None), (0.2, 0.2)):
        spec.update(delta=delta, lambda_=2.0, max_iter=7, epsilon=0.05, candidates=3)
        spec.update(overshoot=0.03, deepfool_max_iter=9, batch_size=4)
        ctx = RecordingContext(config, run, progress=False)
        with pytest.raises(_Stop):
            base.PROBES["sparsity"].run(ctx, spec)
        fn, options = ctx.recorded
        assert fn is bgeom.sparsefool
        assert options == {
            "batch_size": 4,
            "desc": "sparsefool m",
            "lambda_": 2.0,
            "max_iter": 7,
            "epsilon": 0.05,
            "bounds": (0.0, 1.0),
            "delta": expected,
            "candidates": 3,
            "overshoot": 0.03,
            "deepfool_max_iter": 9,
        }


@pytest.mark.parametrize(
    "options,message",
    [
        ({"delta": 0}, "delta must be a number > 0 and <= 1; got 0"),
        ({"delta": 1.5}, "delta must be a number > 0 and <= 1; got 1.5"),
        ({"lambda_": 0.0}, "lambda_ must be a number > 0; got 0.0"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1; got 0"),
        ({"samples": "x"}, "samples must be an integer >= 1; got 'x'"),
    ],
)
def test_bad_sparsity_options_are_refused(options, message):
    config = tiny_config({"probe": "sparsity", **options})
    with pytest.raises(ValueError, match=re.escape(f"probes[0] (sparsity): {message}")):
        suite.validate_config(config)


def test_every_option_is_documented():
    infos = {i.name: i for i in base.PROBES["sparsity"].options.describe()}
    assert list(infos) == [
        "samples",
        "lambda_",
        "max_iter",
        "epsilon",
        "delta",
        "candidates",
        "overshoot",
        "deepfool_max_iter",
        "batch_size",
        "examples",
    ]
    assert infos["delta"].default == 1.0 and "whole range" in infos["delta"].doc
    assert all(info.doc for info in infos.values())
