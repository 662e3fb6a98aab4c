"""The command line: a tiny suite end to end, reuse of finished steps, and bad input."""

import json
import subprocess
import sys

import pytest
from helpers import tiny_config, tiny_dataset, tiny_model, to_toml

TINY_CONFIG = tiny_config(
    {"probe": "margins", "samples": 24, "batch_size": 16, "examples": 2},
    datasets={"d": tiny_dataset(max_train=200)},
    models={"m": tiny_model(activation="softplus", beta=4.0, options={"hidden": [32]})},
)
TINY = to_toml(TINY_CONFIG)


def bgeom(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "bgeom", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.toml").write_text(TINY)
    out = root / "run"
    first = bgeom("suite", "--config", str(root / "tiny.toml"), "--out", str(out), "--no-progress")
    return root, out, first


def test_suite_writes_a_complete_run_folder(tiny_run):
    _, out, first = tiny_run
    assert first.returncode == 0, first.stderr
    assert "report:" in first.stdout
    for path in [
        "config.json",
        "report.html",
        "models/m/summary.json",
        "models/m/run.json",
        "results/margins.json",
        "results/margins.npz",
        "plots/margins-distribution.png",
        "plots/margins-per_class.png",
        "plots/margins-examples-m.png",
        "plots/training.png",
    ]:
        assert (out / path).exists(), path
    result = json.loads((out / "results/margins.json").read_text())
    summary = result["summary"]["m"]
    assert summary["samples"] == 24
    assert 0.0 < summary["median_margin"] < 10.0
    assert summary["flipped_fraction"] == 1.0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # self-contained
    assert "margins" in html and "test accuracy" in html
    # A table of contents links every section.
    for anchor in ("models", "probe-margins", "config"):
        assert f'href="#{anchor}"' in html and f'id="{anchor}"' in html


def test_rerun_reuses_finished_steps(tiny_run):
    root, out, _ = tiny_run
    before = (out / "results/margins.json").read_text()
    again = bgeom("suite", "--config", str(root / "tiny.toml"), "--out", str(out), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "reused finished results" in again.stdout
    assert (out / "results/margins.json").read_text() == before


def test_margins_command(tmp_path):
    out = tmp_path / "m"
    res = bgeom(
        "margins",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--max-train",
        "128",
        "--max-test",
        "16",
        "--samples",
        "8",
        "--out",
        str(out),
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "results/margins.json").read_text())["summary"]["mlp"]
    assert summary["samples"] == 8


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--model", "vgg99", "--out", "{tmp}"], "unknown model 'vgg99'"),
        (["train", "--dataset", "no_such_dataset_xyz", "--out", "{tmp}"], "Unknown dataset"),
        (["margins", "--max-iter", "-3", "--out", "{tmp}"], "--max-iter"),
        (["suite", "--config", "{tmp}/missing.toml"], "does not exist"),
        (["report", "{tmp}"], "not a bgeom run folder"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, match, tmp_path):
    res = bgeom(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert match in lines[0]
    assert "Traceback" not in res.stderr


def test_bad_config_is_rejected(tmp_path):
    cfg = tmp_path / "bad.toml"
    probe = {**TINY_CONFIG["probes"][0], "samplez": 3}
    cfg.write_text(to_toml({**TINY_CONFIG, "probes": [probe]}))
    res = bgeom("suite", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "unknown option(s) ['samplez']" in res.stderr


@pytest.mark.parametrize(
    "command", [[], ["suite"], ["train"], ["margins"], ["prepare"], ["report"], ["probes"]]
)
def test_help(command):
    res = bgeom(*command, "--help")
    assert res.returncode == 0
    assert "usage:" in res.stdout


def test_suite_help_points_to_the_probe_listing():
    res = bgeom("suite", "--help")
    assert res.returncode == 0
    assert "bgeom probes" in " ".join(res.stdout.split())
