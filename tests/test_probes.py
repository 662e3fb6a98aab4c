"""The suite probes: typed options, the context's members and inputs, each probe end to end
on a tiny config, the shared summary statistics, the report's tables and `bgeom probes`."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, tiny_dataset, tiny_model

import bgeom
from bgeom import paths, report, suite
from bgeom import subspaces as S
from bgeom.probes import base

# ------------------------------------------------------------------ the layering


def test_probes_never_import_the_suite():
    folder = Path(base.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "bgeom.suite" for n in names), f"{path.name} imports bgeom.suite"
    code = "import sys, bgeom.probes; assert 'bgeom.suite' not in sys.modules, 'cycle'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert suite.PROBES is base.PROBES and suite.SuiteContext is base.SuiteContext


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "probe,options,message",
    [
        ("curvature", {"samples": "x"}, "samples must be an integer >= 1; got 'x'"),
        ("curvature", {"samples": 0}, "samples must be an integer >= 1; got 0"),
        ("margins", {"samples": 2.5}, "samples must be an integer >= 1; got 2.5"),
        ("margins", {"examples": True}, "examples must be an integer >= 0; got True"),
        ("margins", {"overshoot": -1}, "overshoot must be a number >= 0; got -1"),
        ("margins", {"candidates": 1}, "candidates must be an integer >= 2; got 1"),
        (
            "curvature",
            {"operator": "dense"},
            "operator must be one of 'auto', 'exact', 'fd'; got 'dense'",
        ),
        ("curvature", {"scales": []}, "scales must be a non-empty list, each element a number"),
        (
            "curvature",
            {"false_positive_rate": 1.0},
            "false_positive_rate must be a number >= 0 and < 1",
        ),
        ("connectivity", {"kinds": ["natural", "x"]}, "kinds must be a non-empty list, each"),
        ("connectivity", {"verify_samples": 50}, "verify_samples must be an integer >= 100"),
        ("invariance", {"block": "8"}, "block must be an integer >= 1; got '8'"),
        ("margins", {"samplez": 3}, "unknown option(s) ['samplez']"),
        ("margins", {"models": "m"}, "models must be a list of model names"),
        ("margins", {"models": ["nope"]}, "model 'nope' is not defined under [models]"),
    ],
)
def test_bad_options_say_which_probe_option_and_what_to_do(probe, options, message):
    config = tiny_config({"probe": "margins", "id": "first"}, {"probe": probe, **options})
    with pytest.raises(ValueError, match=re.escape(f"probes[1] ({probe}): {message}")):
        suite.validate_config(config)


def test_resolved_config_lists_every_option_typed():
    config = suite.validate_config(
        tiny_config(
            {"probe": "curvature", "samples": 6.0, "fd_scale": 1, "scales": [1, 3]},
            {"probe": "connectivity", "id": "conn", "kinds": ("natural",)},
        )
    )
    curv, conn = config["probes"]
    options = base.PROBES["curvature"].options
    assert set(curv) == {"probe", "id", "models"} | {i.name for i in options.describe()}
    assert curv["samples"] == 6 and isinstance(curv["samples"], int)
    assert curv["fd_scale"] == 1.0 and isinstance(curv["fd_scale"], float)
    assert curv["scales"] == [1.0, 3.0] and curv["held_out"] == 48
    assert curv["models"] == ["m"] and curv["id"] == "curvature"
    assert conn["kinds"] == ["natural"] and conn["id"] == "conn" and conn["pairs"] == 12
    # The probe sees the same options, typed, in its dataclass.
    opts = options.from_spec(
        {k: v for k, v in curv.items() if k not in ("probe", "id", "models")}, ""
    )
    assert opts.scales == (1.0, 3.0) and opts == options(samples=6, fd_scale=1.0, scales=(1.0, 3.0))
    assert json.loads(json.dumps(config)) == config  # config.json round trip


def test_bgeom_probes_lists_every_option_of_every_probe(capsys):
    from bgeom import cli

    assert cli.main(["probes"]) == 0
    text = capsys.readouterr().out
    sections = {}
    for block in text.split("\n\n"):
        head, *lines = block.splitlines()
        if not head.startswith("Every probe also takes"):
            name = head.split(":")[0]
            sections[name] = (head, [ln for ln in lines if re.match(r"^  \S", ln)], lines)
    assert set(sections) == set(base.PROBES)
    for name, probe in base.PROBES.items():
        head, option_lines, lines = sections[name]
        assert head == f"{name}: {probe.description}"
        infos = probe.options.describe()
        assert [ln.split(":")[0].strip() for ln in option_lines] == [i.name for i in infos]
        for info in infos:
            default = json.dumps(list(info.default) if info.is_list else info.default)
            assert f"  {info.name}: {info.type_name} = {default}" in option_lines
            assert any(info.doc in ln for ln in lines)
    assert "models" in text and "id" in text


# ------------------------------------------------------------------ statistics


def test_summary_statistics_ignore_non_finite_values_and_are_json_safe():
    inf, nan = float("inf"), float("nan")
    assert base.median([]) is None and base.mean([nan]) is None
    assert base.median([1.0, inf, 3.0, nan]) == 2.0 and base.mean([1.0, inf, 3.0]) == 2.0
    assert base.quantiles([], [0.5]) is None
    assert base.quantiles([0.0, 1.0, inf], [0.0, 1.0]) == [0.0, 1.0]
    # Along an axis infinities rank above everything; a quantile landing on one is None.
    assert base.quantiles(np.array([[1.0, 1.0], [3.0, inf]]), [0.5, 1.0], axis=0) == [
        [2.0, None],
        [3.0, None],
    ]
    assert base.censored_median([1.0, inf, inf]) is None
    assert base.censored_median([1.0, 2.0, inf]) == 2.0
    assert base.fraction([]) is None and base.fraction([True, False, True, True]) == 0.75
    assert base.flipped_fraction(np.array([[1.0, inf], [2.0, 3.0]]), axis=0) == [1.0, 0.5]
    safe = base.json_safe({"a": [nan, np.float32(1.5), (inf,)], "b": np.array([1, 2])})
    assert safe == {"a": [None, 1.5, [None]], "b": [1, 2]}
    json.dumps(safe, allow_nan=False)


# ------------------------------------------------------------------ the report


def test_report_tables_hold_scalars_and_a_contents_list_links_every_probe(tmp_path):
    config = suite.validate_config(
        tiny_config({"probe": "curvature"}, {"probe": "margins", "id": "margins two"})
    )
    (tmp_path / "results").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(config))
    summary = {
        "m": {
            "samples": 6,
            "operator": "fd",
            "ok": True,
            "missing": None,
            "quartiles": [0.1, 0.2],
            "curvature_quantiles_10_90": [[1.0] * 63, [2.0] * 63],
            "detection": {"x1": {"auc": 0.9}},
        },
        "other": {"samples": 3, "quartiles": None},
        "threshold": 0.5,
        "grid": [0.0, 1.0],
    }
    result = {"description": "d", "seconds": 1.0, "summary": summary, "figures": {}}
    (tmp_path / "results" / "curvature.json").write_text(json.dumps(result))
    page = report.write_report(tmp_path).read_text()
    tables = "".join(re.findall(r"<table>.*?</table>", page, flags=re.S))
    cells = re.findall(r"<t[dh]>(.*?)</t[dh]>", tables)
    assert "samples" in cells and "operator" in cells and "threshold" in cells
    for absent in ("quartiles", "curvature_quantiles_10_90", "detection", "grid"):
        assert absent not in cells  # lists and nested tables stay in the JSON block
    assert not any("[" in c or "{" in c for c in cells)
    assert "curvature_quantiles_10_90" in page  # ... which still holds them
    for anchor in ("models", "probe-curvature", "probe-margins-two", "config"):
        assert f'href="#{anchor}"' in page and f'id="{anchor}"' in page


# ------------------------------------------------------------------ the context


class SpyContext(base.SuiteContext):
    """A suite context that records the arguments of every ``ctx.map`` by its description."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {}

    def map(self, fn, *args, desc="", **kwargs):
        self.calls[desc] = args
        return super().map(fn, *args, desc=desc, **kwargs)


def _context(tmp_path, config, cls=base.SuiteContext):
    config = suite.validate_config(config)
    return cls(config, tmp_path, progress=False), config


def test_every_member_of_an_ensemble_is_an_entry_of_its_own(tmp_path):
    models = {"e": tiny_model(seeds=[0, 1]), "m": tiny_model()}
    ctx, config = _context(tmp_path, tiny_config({"probe": "margins", "samples": 5}, models=models))
    members = ctx.all_members(["e", "m"])
    assert [m.name for m in members] == ["e[0]", "e[1]", "m"]
    assert [(m.model, m.index, m.seed) for m in members] == [("e", 0, 0), ("e", 1, 1), ("m", 0, 0)]
    assert all(m.features_fn is not None for m in members)
    out = base.PROBES["margins"].run(ctx, config["probes"][0])
    assert set(out.summary) == {"e[0]", "e[1]", "m"}
    assert set(out.figures) == {
        "distribution",
        "per_class",
        "examples-e[0]",
        "examples-e[1]",
        "examples-m",
    }
    x, _ = ctx.test_inputs("e", 5)
    for member in members:
        assert out.arrays[f"{member.name}/margin"].shape == (1, 5)
        assert out.summary[member.name]["members"] == 1
        ref = jax.vmap(lambda xi, m=member: bgeom.deepfool(m.apply_fn, m.params, xi))(x)
        np.testing.assert_allclose(
            out.arrays[f"{member.name}/margin"][0], np.asarray(ref.margin), rtol=1e-4, atol=1e-5
        )
    assert not np.allclose(out.arrays["e[0]/margin"], out.arrays["e[1]/margin"])


def test_curvature_probe_analyses_a_flip_trained_model_on_flipped_images(tmp_path):
    models = {"flip": tiny_model(augment="flip", activation="softplus", beta=5.0)}
    probe = {
        "probe": "curvature",
        "samples": 4,
        "held_out": 3,
        "k": 2,
        "full_spectrum_max_dim": 10,
        "subspace_dim": 2,
        "slq_probes": 1,
        "slq_matvecs": 4,
        "directions": 2,
        "scales": [1.0],
        "batch_size": 4,
    }
    datasets = {"d": tiny_dataset(max_train=200, max_test=20)}
    ctx, config = _context(
        tmp_path, tiny_config(probe, datasets=datasets, models=models), SpyContext
    )
    out = base.PROBES["curvature"].run(ctx, config["probes"][0])
    data = ctx.model_dataset("flip")
    test, held = np.asarray(S.flip(data.x_test[:4])), np.asarray(S.flip(data.x_train[:3]))
    assert not np.allclose(test, data.x_test[:4])  # the flip moves the images
    for name, x in (("test", test), ("held-out", held)):
        got, _ = (ctx.test_inputs if name == "test" else ctx.train_inputs)("flip", len(x))
        np.testing.assert_allclose(got, x, atol=1e-6, err_msg=name)
    # Boundary curvature ran on the flipped test AND held-out images ...
    _, images = ctx.calls["curvature flip"]
    np.testing.assert_allclose(images, np.concatenate([test, held]), atol=1e-6)
    _, images, _ = ctx.calls["SLQ flip"]
    np.testing.assert_allclose(images, test, atol=1e-6)
    # ... and its labels are the model's on them.
    member = ctx.members("flip")[0]
    labels = jnp.argmax(jax.vmap(lambda xi: member.apply_fn(member.params, xi))(test), -1)
    np.testing.assert_array_equal(out.arrays["flip/label"], np.asarray(labels))


# ------------------------------------------------------------------ each probe end to end


def test_curvature_probe_writes_every_number_behind_its_plots(tmp_path):
    """The suite probe end to end on a tiny MLP, through its large-image branch
    (top/bottom k and the SLQ density, forced by full_spectrum_max_dim)."""
    config = tiny_config(
        {
            "probe": "curvature",
            "samples": 6,
            "held_out": 6,
            "k": 4,
            "full_spectrum_max_dim": 10,
            "subspace_dim": 3,
            "slq_probes": 2,
            "slq_matvecs": 8,
            "directions": 4,
            "batch_size": 6,
        },
        name="tiny-curvature",
        models={"m": tiny_model(activation="softplus", beta=5.0)},
    )
    suite.run(config, tmp_path, progress=False, log=lambda s: None)
    result = json.loads((tmp_path / "results" / "curvature.json").read_text())
    s = result["summary"]["m"]
    assert s["operator"] == "exact" and s["spectrum"] == "top/bottom 4"
    assert len(s["mean_sorted_curvatures"]) == 4 and len(s["density"]) == len(s["density_grid"])
    assert s["density_method"].startswith("stochastic Lanczos quadrature")
    assert 0.0 <= s["flat_fraction_median"] <= 1.0
    assert set(s["detection"]) == {"x1", "x2", "x5"} and 0.0 <= s["auc_x1"] <= 1.0
    assert len(s["roc"]["x1"]["fpr"]) == len(s["roc"]["x1"]["tpr"])
    assert set(result["figures"]) == {"spectrum", "detection", "directions-m"}
    for name in result["figures"].values():
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    arrays = np.load(tmp_path / "results" / "curvature.npz")
    assert arrays["m/curvatures"].shape == (6, 4)
    assert arrays["m/shared_basis"].shape == (3, 8, 8, 1)


def test_connectivity_probe_writes_every_number_behind_its_plots(tmp_path):
    config = tiny_config(
        {
            "probe": "connectivity",
            "pairs": 3,
            "max_anchors": 7,
            "samples": 20,
            "verify_samples": 100,
            "grid": 7,
            "examples": 1,
        },
        name="tiny-connectivity",
    )
    suite.run(config, tmp_path, progress=False, log=lambda s: None)
    result = json.loads((tmp_path / "results" / "connectivity.json").read_text())
    summary = result["summary"]
    arrays = np.load(tmp_path / "results" / "connectivity.npz")
    assert set(summary) == {"m/all"} | {f"m/{k}" for k in paths.PAIR_KINDS}
    connected, kind = arrays["m/connected"], arrays["m/kind"]
    assert len(connected) == summary["m/all"]["pairs"] == 9 - summary["m/all"]["pushes_failed"]
    for k, name in enumerate(paths.PAIR_KINDS):
        s = summary[f"m/{name}"]
        assert s["connected_fraction"] == pytest.approx(connected[kind == k].mean())
        straight = arrays["m/straight_ok"][kind == k]
        assert s["straight_leaves_fraction"] == pytest.approx((~straight).mean())
        assert sum(s["anchors_histogram"]) == int(connected[kind == k].sum())
        assert len(s["length_ratios"]) == int(connected[kind == k].sum())
    assert "summary" in result["figures"]
    planes = summary["m/all"].get("planes", {})
    if planes:  # a plane needs a connected path with an anchor
        assert arrays["m/plane0/labels"].shape == (7, 7)
        assert "planes-m" in result["figures"]
    else:
        assert any("no connected path needed an anchor" in n for n in result["notes"])
    for name in result["figures"].values():
        assert (tmp_path / "plots" / name).stat().st_size > 1000


INVARIANCE = tiny_config(
    {"probe": "invariance", "samples": 6, "block": 2, "max_iter": 30},
    name="tiny-invariance",
    datasets={
        "d": tiny_dataset(max_test=20),
        "s": {"name": "synthetic", "options": {"shape": [8, 8, 1], "n_train": 200, "n_test": 20}},
    },
    models={
        "plain": tiny_model(options={}),
        "flip": tiny_model(options={}, augment="flip"),
        "synth": tiny_model("s", options={}),
    },
)


def test_invariance_probe_writes_every_number_behind_its_plots(tmp_path):
    suite.run(INVARIANCE, tmp_path, progress=False, log=lambda s: None)
    result = json.loads((tmp_path / "results" / "invariance.json").read_text())
    summary = result["summary"]
    assert len(summary["plain"]["median"]) == 7 and summary["flip"]["augment"] == "flip"
    assert "plain vs reversed flip" in summary["mirror_spearman"]
    assert "median_margin_along_u" in summary["synth"]["synthetic"]
    assert set(result["figures"]) == {"profile", "synthetic", "inputs"}
    for name in result["figures"].values():
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    arrays = np.load(tmp_path / "results" / "invariance.npz")
    assert arrays["plain/margin"].shape == (1, 6, 7)
