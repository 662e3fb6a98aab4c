"""The benchmark-suite runner: a config in, a run folder out.

A config names datasets, models (each trained on one dataset) and probes. A
probe is one registered function ``probe(ctx, opts, *, probe_id, models) ->
ProbeOutput`` with a typed options dataclass (``bgeom.probes.base``; `bgeom
probes` lists them): it becomes usable in configs, is validated, cached and
shown in the report. See docs/suite.md.

Run folder layout::

    config.json                 the resolved config of the last run
    models/<name>/              orbax checkpoints + run.json + summary.json
    results/<probe>.json        summary numbers (+ fingerprint of what made them)
    results/<probe>.npz         the arrays behind them
    plots/<probe>-<fig>.png     figures
    report.html                 self-contained report (images embedded)

Re-running reuses every finished step: a model whose checkpoint is complete is
loaded, a probe whose fingerprint (its resolved options plus the specs of its
models and datasets) is unchanged is not recomputed. An interrupted training
resumes at the step it stopped at.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bgeom import augment as augment_lib
from bgeom import models as models_lib
from bgeom import train as train_lib

# Importing the probes package registers every probe in PROBES.
from bgeom.probes import base as _base
from bgeom.probes.base import (  # noqa: F401  (re-exported: bgeom.suite.<name> keeps working)
    PROBES,
    Member,
    Probe,
    ProbeOptions,
    ProbeOutput,
    SuiteContext,
    option,
    register_probe,
)

# The embedded default (``make demo``): digits, nine small models, eight
# probes; its run time is measured in README.md (budget: 5 minutes on 2 cores).
DEFAULT_CONFIG: dict[str, Any] = {
    "name": "digits",
    "seed": 0,
    "datasets": {
        "digits": {"name": "digits"},
        # "Hold me tight!" grid: 28x28 images, 8x8 DCT blocks, stride 1 (21 blocks).
        "digits28": {"name": "digits", "size": 28},
        "synthetic": {"name": "synthetic", "options": {"shape": [28, 28, 1], "eps": 0.5}},
    },
    "models": {
        "cnn-relu": {"dataset": "digits", "model": "cnn", "activation": "relu"},
        "cnn-softplus": {
            "dataset": "digits",
            "model": "cnn",
            "activation": "softplus",
            "beta": 5.0,
        },
        "mlp-relu": {"dataset": "digits", "model": "mlp", "activation": "relu"},
        # The ReLU CNN trained on PRIME-augmented digits (robustness probe).
        "cnn-prime": {
            "dataset": "digits",
            "model": "cnn",
            "activation": "relu",
            "augment": {"name": "prime"},
        },
        # The invariance experiments: one MLP per training variant on 28x28 digits.
        "mlp28": {"dataset": "digits28", "model": "mlp"},
        "mlp28-flip": {"dataset": "digits28", "model": "mlp", "augment": "flip"},
        "mlp28-lowpass": {
            "dataset": "digits28",
            "model": "mlp",
            "augment": {"name": "low_pass", "bandwidth": 10},
        },
        "mlp28-pgd": {
            "dataset": "digits28",
            "model": "mlp",
            "augment": {"name": "pgd", "eps": 2.0, "steps": 7},
        },
        "mlp-synthetic": {"dataset": "synthetic", "model": "mlp"},
    },
    "probes": [
        {"probe": "margins", "models": ["cnn-relu", "cnn-softplus", "mlp-relu"]},
        {
            "probe": "invariance",
            "models": ["mlp28", "mlp28-flip", "mlp28-lowpass", "mlp28-pgd", "mlp-synthetic"],
        },
        # Boundary curvature on one smooth and one ReLU (finite-difference) model.
        {"probe": "curvature", "models": ["cnn-softplus", "mlp-relu"]},
        # Paths inside class regions between pairs of same-class points.
        {"probe": "connectivity", "models": ["cnn-relu", "cnn-softplus", "mlp-relu"]},
        # Sparse perturbations (SparseFool) against DeepFool's, per-class pixel maps.
        {"probe": "sparsity", "models": ["cnn-relu", "cnn-softplus", "mlp-relu"]},
        # DeepDIG's borderline instances for two digit pairs.
        {
            "probe": "borderline",
            "models": ["cnn-relu"],
            "pairs": ["3-8", "4-9"],
            "steps": 80,
            "batch_size": 32,
            "partners": 3,
            "geometry_samples": 8,
            "examples": 3,
        },
        # Class polyhedra, convex hulls and morphing in the last hidden layer.
        {"probe": "features", "models": ["cnn-relu"]},
        # Common corruptions: standard vs PRIME-trained CNN, mCE, DCT margin profiles.
        {
            "probe": "robustness",
            "models": ["cnn-relu", "cnn-prime"],
            "baseline": "cnn-relu",
            "samples": 200,
            "margin_samples": 8,
        },
    ],
}

_MODEL_KEYS = {"dataset", "model", "activation", "beta", "seeds", "train", "options", "augment"}
_DATASET_KEYS = {"name", "size", "data_dir", "max_train", "max_test", "options"}


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_config(path: str | Path | None) -> dict[str, Any]:
    """Read a TOML or JSON config (``None``: the embedded default) and validate it."""
    if path is None:
        return validate_config(copy.deepcopy(DEFAULT_CONFIG))
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Config file {path} does not exist.")
    text = path.read_text()
    try:
        config = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot parse {path}: {e}.") from None
    return validate_config(config)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a config and fill in every default; return the resolved config."""
    if not isinstance(config, dict):
        raise ValueError("A suite config must be a table/object.")
    unknown = set(config) - {"name", "seed", "datasets", "models", "probes"}
    if unknown:
        raise ValueError(f"Unknown config key(s) {sorted(unknown)}.")
    out: dict[str, Any] = {"name": str(config.get("name", "suite")), "seed": config.get("seed", 0)}
    datasets = config.get("datasets") or {}
    if not datasets:
        raise ValueError("The config needs at least one entry under [datasets].")
    out["datasets"] = {}
    for key, spec in datasets.items():
        bad = set(spec) - _DATASET_KEYS
        if bad:
            raise ValueError(
                f"datasets.{key}: unknown key(s) {sorted(bad)}; valid: {sorted(_DATASET_KEYS)}."
            )
        if "name" not in spec:
            raise ValueError(f"datasets.{key}: needs a name (digits, synthetic or a TFDS name).")
        out["datasets"][key] = dict(spec)
    models = config.get("models") or {}
    if not models:
        raise ValueError("The config needs at least one entry under [models].")
    out["models"] = {
        key: _resolve_model(key, spec, out["datasets"]) for key, spec in models.items()
    }
    out["probes"] = _resolve_probes(config.get("probes") or [], list(out["models"]))
    return out


def _resolve_model(key: str, spec: dict[str, Any], datasets: dict[str, Any]) -> dict[str, Any]:
    """One [models] entry, checked, with every default filled in."""
    bad = set(spec) - _MODEL_KEYS
    if bad:
        raise ValueError(
            f"models.{key}: unknown key(s) {sorted(bad)}; valid: {sorted(_MODEL_KEYS)}."
        )
    spec = dict(spec)
    if spec.get("model") not in models_lib.MODELS:
        raise ValueError(
            f"models.{key}: unknown model {spec.get('model')!r}; choose one of "
            f"{', '.join(models_lib.MODELS)}."
        )
    if spec.get("dataset") not in datasets:
        raise ValueError(
            f"models.{key}: dataset {spec.get('dataset')!r} is not defined under [datasets]."
        )
    spec.setdefault("activation", "relu")
    spec.setdefault("beta", 1.0)
    spec.setdefault("seeds", 0)
    spec.setdefault("options", {})
    spec.setdefault("augment", None)
    augment_lib.get(spec["augment"])  # validates the training transform
    models_lib.get_activation(spec["activation"], spec["beta"])
    train_spec = dict(spec.get("train") or {})
    recipe_name = train_spec.pop("recipe", "default")
    train_lib.recipe(recipe_name, **train_spec)  # validates
    spec["train"] = {"recipe": recipe_name, **train_spec}
    return spec


def _resolve_probes(probes: list[Any], model_keys: list[str]) -> list[dict[str, Any]]:
    """The [[probes]] tables, checked against each probe's options, with every option listed."""
    out = []
    seen = set()
    for i, spec in enumerate(probes):
        if not isinstance(spec, dict):
            raise ValueError(f'probes[{i}]: a probe is a table with probe = "<name>".')
        spec = dict(spec)
        name = spec.pop("probe", None)
        if name not in PROBES:
            raise ValueError(
                f"probes[{i}]: unknown probe {name!r}; available: {', '.join(sorted(PROBES))} "
                "(`bgeom probes` lists them with their options)."
            )
        label = spec.pop("id", name)
        if not isinstance(label, str) or not label:
            raise ValueError(f"probes[{i}] ({name}): id must be a non-empty string.")
        if label in seen:
            raise ValueError(f"probes[{i}]: two probes are called {label!r}; give one an id.")
        seen.add(label)
        models_used = spec.pop("models", list(model_keys))
        if isinstance(models_used, str) or not isinstance(models_used, list | tuple):
            raise ValueError(f"probes[{i}] ({name}): models must be a list of model names.")
        if not models_used:
            raise ValueError(f"probes[{i}] ({name}): models is empty; name at least one model.")
        for m in models_used:
            if m not in model_keys:
                raise ValueError(
                    f"probes[{i}] ({name}): model {m!r} is not defined under [models]."
                )
        options = PROBES[name].options.from_spec(spec, f"probes[{i}] ({name})")
        out.append({"probe": name, "id": label, "models": list(models_used), **options.to_spec()})
    return out


def _probe_fingerprint(config: dict[str, Any], spec: dict[str, Any]) -> str:
    models = {m: config["models"][m] for m in spec["models"]}
    datasets = {m["dataset"]: config["datasets"][m["dataset"]] for m in models.values()}
    return _fingerprint({"probe": spec, "models": models, "datasets": datasets})


def _save_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    tmp.replace(path)  # atomic: an interrupted write never leaves a half file


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray | jax.Array):
        return np.asarray(o).tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def run(
    config: dict[str, Any] | str | Path | None = None,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Run a suite and write its run folder; return the path of ``report.html``.

    In a multi-process run (``jax.distributed`` started, e.g. by ``bgeom suite
    --distributed``) every process calls this with the same arguments: process
    0 trains the models (in a single-process child, one writer for the
    checkpoints), every process then loads them, every probe's per-example work
    is split over the devices of all processes by ``ctx.map`` and gathered,
    and only process 0 writes files or logs. The run folder must then be on a
    filesystem every process sees.

    Args:
      config: a config dict, a TOML/JSON file, or ``None`` for the embedded default.
      out: the run folder (default ``runs/<config name>``).
      progress: show progress bars.
      log: where one-line status messages go.
    """
    import matplotlib

    matplotlib.use("Agg")

    from bgeom import report
    from bgeom.sharding import on_process_zero, process_info

    if isinstance(config, dict):
        config = validate_config(config)
    else:
        config = load_config(config)
    out = Path(out) if out is not None else Path("runs") / config["name"]
    processes = process_info()
    writer = processes.index == 0
    if not writer:
        progress = False
        log = lambda message: None

    def prepare_folder() -> None:
        for sub in ("models", "results", "plots"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        _save_json(out / "config.json", config)

    on_process_zero(prepare_folder, "prepare")
    ctx = SuiteContext(config, out, progress)

    started = time.time()
    if processes.count > 1:
        # Orbax cannot save process-local arrays from several processes, and
        # one writer is wanted anyway: process 0 trains every model (or finds
        # it finished) in a single-process child; the others wait, then every
        # process loads the finished checkpoints below.
        on_process_zero(lambda: _train_in_child(out, progress), "train")
    for key in config["models"]:
        t0 = time.time()
        result = ctx.model(key)
        acc = ", ".join(f"{a:.3f}" for a in np.atleast_1d(result.test_accuracy))
        log(f"model {key}: test accuracy {acc} ({time.time() - t0:.1f}s)")

    for spec in config["probes"]:
        _run_probe(ctx, spec, log)

    report_path = Path(on_process_zero(lambda: str(report.write_report(out)), "report"))
    log(f"suite {config['name']} finished in {time.time() - started:.1f}s; report: {report_path}")
    return report_path


def _run_probe(ctx: SuiteContext, spec: dict[str, Any], log: Callable[[str], None]) -> None:
    """Run one resolved probe entry and write its results, unless they are finished."""
    import matplotlib.pyplot as plt

    from bgeom.sharding import on_process_zero

    out = ctx.out
    probe = PROBES[spec["probe"]]
    fingerprint = _probe_fingerprint(ctx.config, spec)
    result_path = out / "results" / f"{spec['id']}.json"

    def finished() -> bool:
        if not result_path.exists():
            return False
        return json.loads(result_path.read_text()).get("fingerprint") == fingerprint

    # Process 0 decides, so that every process skips or runs the same probes.
    if on_process_zero(finished, f"reuse {spec['id']}"):
        log(f"probe {spec['id']}: reused finished results")
        return
    t0 = time.time()
    output = probe.run(ctx, spec)

    def write() -> None:
        figures = {}
        for fig_name, fig in output.figures.items():
            path = out / "plots" / f"{spec['id']}-{fig_name}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            figures[fig_name] = path.name
        if output.arrays:
            np.savez_compressed(out / "results" / f"{spec['id']}.npz", **output.arrays)
        _save_json(
            result_path,
            {
                "probe": spec["probe"],
                "id": spec["id"],
                "description": probe.description,
                "spec": spec,
                "fingerprint": fingerprint,
                "seconds": round(time.time() - t0, 2),
                "summary": _base.json_safe(output.summary),
                "figures": figures,
                "notes": output.notes,
            },
        )

    try:
        on_process_zero(write, f"write {spec['id']}")
    finally:
        for fig in output.figures.values():
            plt.close(fig)
    log(f"probe {spec['id']}: done ({time.time() - t0:.1f}s)")


def _train_in_child(out: Path, progress: bool) -> None:
    """Train (or load) every model of the run folder ``out`` in a single-process child.

    The child reads ``out/config.json`` and starts no ``jax.distributed``, so
    orbax writes the checkpoints as in a one-process run. This process starts
    no JAX backend meanwhile (a GPU stays free for the child).
    """
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = "import sys; from bgeom import suite; suite._train_models(*sys.argv[1:])"
    status = subprocess.run(
        [sys.executable, "-c", code, str(out), "1" if progress else "0"], env=env
    ).returncode
    if status != 0:
        raise RuntimeError(f"training the models of {out} failed in a child process ({status}).")


def _train_models(out: str | Path, progress: str = "1") -> None:
    """Train (or load) every model of the run folder ``out`` (see ``_train_in_child``)."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    ctx = SuiteContext(config, out, progress == "1")
    for key in config["models"]:
        ctx.model(key)
