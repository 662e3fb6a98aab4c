"""The benchmark-suite runner: a config in, a run folder out.

A config names datasets, models (each trained on one dataset) and probes. A
probe is one registered function ``probe(ctx, spec) -> ProbeOutput``; add one
with ``@register_probe("name", option=default, ...)`` and it becomes usable in
configs, is validated, cached and shown in the report.

Run folder layout::

    config.json                 the resolved config of the last run
    models/<name>/              orbax checkpoints + run.json + summary.json
    results/<probe>.json        summary numbers (+ fingerprint of what made them)
    results/<probe>.npz         the arrays behind them
    plots/<probe>-<fig>.png     figures
    report.html                 self-contained report (images embedded)

Re-running reuses every finished step: a model whose checkpoint is complete is
loaded, a probe whose fingerprint (its spec plus the specs of its models and
datasets) is unchanged is not recomputed. An interrupted training resumes at
the step it stopped at.
"""

from __future__ import annotations

import copy
import dataclasses
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
from bgeom import data as data_lib
from bgeom import models as models_lib
from bgeom import train as train_lib

# The embedded default: digits, three small models, DeepFool margins. Runs in
# about a minute on 2 CPU cores.
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
    ],
}

_MODEL_KEYS = {"dataset", "model", "activation", "beta", "seeds", "train", "options", "augment"}
_DATASET_KEYS = {"name", "size", "data_dir", "max_train", "max_test", "options"}


@dataclasses.dataclass
class ProbeOutput:
    """What a probe returns: numbers for the summary, arrays, and figures.

    Attributes:
      summary: JSON-serialisable numbers (every number behind every plot).
      arrays: named NumPy arrays saved to ``results/<probe>.npz``.
      figures: named matplotlib figures saved as PNG and embedded in the report.
      notes: sentences for the report (caveats, what was skipped and why).
    """

    summary: dict[str, Any]
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Probe:
    name: str
    fn: Callable[[SuiteContext, dict], ProbeOutput]
    defaults: dict[str, Any]
    description: str


PROBES: dict[str, Probe] = {}


def register_probe(name: str, **defaults: Any) -> Callable:
    """Register ``fn(ctx, spec) -> ProbeOutput`` as the suite probe ``name``.

    ``defaults`` are the probe's options; a config may override them and any
    other key is rejected. Every probe also takes ``models`` (default: all).
    """

    def decorator(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()
        PROBES[name] = Probe(name, fn, dict(defaults), doc[0] if doc else name)
        return fn

    return decorator


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
    out["models"] = {}
    for key, spec in models.items():
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
        if spec.get("dataset") not in out["datasets"]:
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
        out["models"][key] = spec
    probes = config.get("probes") or []
    out["probes"] = []
    seen = set()
    for i, spec in enumerate(probes):
        spec = dict(spec)
        name = spec.pop("probe", None)
        if name not in PROBES:
            raise ValueError(
                f"probes[{i}]: unknown probe {name!r}; available: {', '.join(sorted(PROBES))}."
            )
        probe = PROBES[name]
        label = spec.pop("id", name)
        if label in seen:
            raise ValueError(f"probes[{i}]: two probes are called {label!r}; give one an id.")
        seen.add(label)
        models_used = spec.pop("models", list(out["models"]))
        for m in models_used:
            if m not in out["models"]:
                raise ValueError(
                    f"probes[{i}] ({name}): model {m!r} is not defined under [models]."
                )
        bad = set(spec) - set(probe.defaults)
        if bad:
            raise ValueError(
                f"probes[{i}] ({name}): unknown option(s) {sorted(bad)}; valid: "
                f"{sorted(probe.defaults)}."
            )
        out["probes"].append(
            {"probe": name, "id": label, "models": list(models_used), **probe.defaults, **spec}
        )
    return out


class SuiteContext:
    """What a probe sees: the datasets, the trained models, the output folder."""

    def __init__(self, config: dict[str, Any], out: Path, progress: bool = True):
        self.config = config
        self.out = out
        self.progress = progress
        # The mesh ctx.map sweeps over; None: every device of every process.
        self.mesh = None
        self._datasets: dict[str, data_lib.Dataset] = {}
        self._models: dict[str, train_lib.TrainResult] = {}

    def dataset(self, key: str) -> data_lib.Dataset:
        """The dataset defined as ``key`` in the config (loaded once)."""
        if key not in self._datasets:
            spec = dict(self.config["datasets"][key])
            options = spec.pop("options", {}) or {}
            name = spec.pop("name")
            if name == "synthetic" and "shape" in options:
                options = {**options, "shape": tuple(options["shape"])}
            self._datasets[key] = data_lib.load(name, **spec, **options)
        return self._datasets[key]

    def model_dataset(self, model_key: str) -> data_lib.Dataset:
        return self.dataset(self.config["models"][model_key]["dataset"])

    def model(self, key: str) -> train_lib.TrainResult:
        """The model defined as ``key``, trained on first use (or loaded if finished)."""
        if key not in self._models:
            spec = self.config["models"][key]
            train_spec = dict(spec["train"])
            config = train_lib.recipe(train_spec.pop("recipe"), **train_spec)
            folder = self.out / "models" / key
            seeds = spec["seeds"]
            result = train_lib.fit(
                spec["model"],
                self.model_dataset(key),
                config=config,
                seeds=seeds if isinstance(seeds, int) else list(seeds),
                checkpoint_dir=folder,
                progress=self.progress,
                name=key,
                transform=augment_lib.get(spec.get("augment")),
                activation=spec["activation"],
                beta=spec["beta"],
                **spec["options"],
            )
            summary = {
                "model": key,
                "spec": spec,
                "test_accuracy": np.atleast_1d(result.test_accuracy).tolist(),
                "history": {k: v.tolist() for k, v in result.history.items()},
            }
            if _is_writer():  # in a multi-process run only process 0 writes
                (folder / "summary.json").write_text(json.dumps(summary, indent=2))
            self._models[key] = result
        return self._models[key]

    def test_inputs(self, key: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` test images of model ``key``'s dataset, as the model sees them.

        Models trained with a transform that maps inputs (``augment = "flip"``,
        ``low_pass``) are probed on the mapped images, as in "Hold me tight!".
        """
        data = self.model_dataset(key)
        n = len(data.x_test) if n is None else min(int(n), len(data.x_test))
        x, y = data.x_test[:n], data.y_test[:n]
        inputs = self.model(key).inputs
        if inputs is not None:
            x = np.asarray(inputs(x))
        return x, y

    def members(self, key: str) -> list[tuple[Callable, Any]]:
        """``(apply_fn, params)`` of every member of model ``key`` (one unless an ensemble)."""
        result = self.model(key)
        return [result.member(i) for i in range(len(result.seeds))]

    def map(
        self,
        fn: Callable,
        *args: Any,
        in_axes: tuple[int | None, ...] | int = 0,
        batch_size: int = 128,
        desc: str = "",
    ) -> Any:
        """``jax.jit(jax.vmap(fn, in_axes))(*args)`` through ``bgeom.sweep``, with progress.

        Arguments with ``in_axes`` 0 are mapped over their leading axis, split
        over every device (and every process of a multi-process run) and
        chunked ``batch_size`` examples at a time; those with ``None``
        (parameters) are passed whole and replicated. One compiled function
        serves every chunk; the padding of the last chunk is dropped. Returns
        NumPy arrays, the whole result on every process.
        """
        from bgeom.sharding import sweep

        return sweep(
            fn,
            *args,
            in_axes=in_axes,
            mesh=self.mesh,
            batch_size=batch_size,
            progress=self.progress,
            desc=desc,
        )


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
    import matplotlib.pyplot as plt

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
        probe = PROBES[spec["probe"]]
        fingerprint = _probe_fingerprint(config, spec)
        result_path = out / "results" / f"{spec['id']}.json"

        def finished(result_path: Path = result_path, fingerprint: str = fingerprint) -> bool:
            if not result_path.exists():
                return False
            return json.loads(result_path.read_text()).get("fingerprint") == fingerprint

        # Process 0 decides, so that every process skips or runs the same probes.
        if on_process_zero(finished, f"reuse {spec['id']}"):
            log(f"probe {spec['id']}: reused finished results")
            continue
        t0 = time.time()
        output = probe.fn(ctx, spec)

        def write(spec=spec, probe=probe, output=output, t0=t0, fingerprint=fingerprint):
            figures = {}
            for fig_name, fig in output.figures.items():
                path = out / "plots" / f"{spec['id']}-{fig_name}.png"
                fig.savefig(path, dpi=110, bbox_inches="tight")
                figures[fig_name] = path.name
            if output.arrays:
                np.savez_compressed(out / "results" / f"{spec['id']}.npz", **output.arrays)
            _save_json(
                out / "results" / f"{spec['id']}.json",
                {
                    "probe": spec["probe"],
                    "id": spec["id"],
                    "description": probe.description,
                    "spec": spec,
                    "fingerprint": fingerprint,
                    "seconds": round(time.time() - t0, 2),
                    "summary": output.summary,
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

    report_path = Path(on_process_zero(lambda: str(report.write_report(out)), "report"))
    log(f"suite {config['name']} finished in {time.time() - started:.1f}s; report: {report_path}")
    return report_path


def _is_writer() -> bool:
    from bgeom.sharding import process_info

    return process_info().index == 0


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


# The probes live in bgeom/probes/, one module each; importing the package
# registers them. Imported last because they import this module.
from bgeom import probes as _probes  # noqa: E402, F401
