"""DeepFool margins through ``bgeom.sweep`` and ``bgeom.batched`` on 1, 2 and 4 devices.

The same trained models (digits MLP and CNN, trained once here and loaded by
every worker from one checkpoint) and the same images are swept with
``bgeom.sweep(deepfool, params, x, in_axes=(None, 0))`` on CPU meshes of 1, 2
and 4 devices. Each device count runs in its own worker process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (the device count of a
process is fixed when JAX starts). The 1-device worker also times plain
``jax.jit(jax.vmap(deepfool))``, the baseline the sweep must not slow down.
Every worker also times ``bgeom.batched(bgeom.deepfool)``, whose slots are
split over the worker's devices.
When JAX sees a GPU, a GPU worker runs too; otherwise the section says so.

Forced host devices split one machine's cores: with fewer cores than devices
they compete, so these figures measure sweep's sharding overhead and scaling
on this machine, not what separate accelerators would give.

Usage::

    python benchmarks/bench_sweep.py [--batch 512 --cnn-batch 64 --repeats 3]

Writes ``OUT/sweep.json`` and rewrites the sweep section of ``BENCHMARKS.md``.
Exits 1 when the margins of any device count differ from the 1-device run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    add_output_options,
    add_repeats,
    block,
    command_line,
    first_images,
    fmt_seconds,
    generated_section,
    import_bgeom,
    load_average,
    machine_info,
    machine_line,
    machine_summary,
    publish,
    results_record,
    test_accuracy,
    versions_bullet,
)

AGREEMENT_RTOL = 1e-3  # margins of a D-device sweep vs the 1-device sweep
#: The versions a sweep run records (its workers' devices are recorded per worker).
VERSIONS = ("jax", "jaxlib", "flax", "numpy")


# --------------------------------------------------------------------------- worker


def _max_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over finite margins; inf when a label flipped in one run only."""
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")
    finite = np.isfinite(a)
    return float(np.max(np.abs(a[finite] - b[finite]))) if finite.any() else 0.0


class _Worker:
    """The state of a worker process: models loaded, sweeps compiled, ready to time."""

    def __init__(self, args: argparse.Namespace):
        import jax

        bgeom = import_bgeom()
        data = bgeom.data.load("digits")
        self.info: dict[str, Any] = {
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind,
            "models": {},
        }
        self.sweeps: dict[str, Any] = {}
        self.plains: dict[str, Any] = {}
        self.engines: dict[str, Any] = {}
        options = dict(
            candidates=args.candidates,
            overshoot=args.overshoot,
            max_iter=args.steps,
            bounds=(0.0, 1.0),
        )
        for name in args.models:
            option = "--cnn-batch" if name == "cnn" else "--batch"
            batch = args.cnn_batch if name == "cnn" else args.batch
            x = first_images(data, batch, option)
            trained = bgeom.train.fit(
                name, data, seeds=0, checkpoint_dir=Path(args.checkpoints) / name, progress=False
            )
            apply_fn, params = trained.apply_fn, trained.params

            def fn(p, xi, apply_fn=apply_fn):
                return bgeom.deepfool(apply_fn, p, xi, **options)

            def run(fn=fn, params=params, x=x):
                return bgeom.sweep(
                    fn,
                    params,
                    x,
                    in_axes=(None, 0),
                    batch_size=args.chunk,
                    progress=False,
                    return_stats=True,
                )

            start = time.perf_counter()
            result, stats = run()  # compiles; later calls reuse the compiled sweep
            first_call = time.perf_counter() - start
            self.sweeps[name] = run
            row: dict[str, Any] = {
                "batch": batch,
                "chunk_size": stats.chunk_size,
                "chunks": stats.chunks,
                "padding": stats.padding,
                "devices_used": stats.devices,
                "compile_seconds": stats.compile_seconds,
                "first_call_seconds": first_call,
                "flip_rate": float(np.mean(result.converged)),
                "margin": np.asarray(result.margin, np.float64).tolist(),
                "label": np.asarray(result.label).tolist(),
            }

            # The same searches through bgeom.batched: compaction, its slots split
            # over this process's devices.
            def engine(apply_fn=apply_fn, params=params, x=x):
                return bgeom.batched(bgeom.deepfool)(
                    apply_fn, params, x, return_stats=True, **options
                )

            start = time.perf_counter()
            out, estats = engine()
            row["engine"] = {
                "first_call_seconds": time.perf_counter() - start,
                "devices_used": estats.devices,
                "slots": estats.slots,
                "work_efficiency": estats.work_efficiency,
                "margin": np.asarray(out.margin, np.float64).tolist(),
                "label": np.asarray(out.label).tolist(),
            }
            self.engines[name] = engine
            if args.baseline:
                # Plain jit(vmap) on the default device: what sweep replaces.
                plain = jax.jit(jax.vmap(fn, in_axes=(None, 0)))
                xj = jax.numpy.asarray(x)
                start = time.perf_counter()
                plain_out = block(plain(params, xj))
                row["jit_vmap"] = {
                    "first_call_seconds": time.perf_counter() - start,
                    "max_abs_margin_difference": _max_difference(
                        np.asarray(plain_out.margin), np.asarray(result.margin)
                    ),
                }
                self.plains[name] = lambda plain=plain, params=params, xj=xj: block(
                    plain(params, xj)
                )
            self.info["models"][name] = row

    def time(self, what: str, name: str) -> float:
        """Seconds of one sweep, ``bgeom.batched`` or plain jit(vmap) call (``what``)."""
        fn = {"sweep": self.sweeps, "engine": self.engines, "plain": self.plains}[what][name]
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def worker(args: argparse.Namespace) -> int:
    """Serve timing requests on stdin ("sweep|engine|plain NAME"), answers on stdout.

    The devices of this process are fixed by ``XLA_FLAGS`` / the platform. The
    parent keeps one worker per device count alive and alternates its requests
    between them, so that a change in the machine's load hits every row alike.
    """
    state = _Worker(args)
    print(json.dumps(state.info), flush=True)
    for line in sys.stdin:
        what, name = line.split()
        print(json.dumps({"seconds": state.time(what, name)}), flush=True)
    return 0


# --------------------------------------------------------------------------- parent


class _Spawned:
    """A worker process and its answers."""

    def __init__(self, args: argparse.Namespace, checkpoints: Path, env: dict[str, str], baseline):
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "--checkpoints",
            str(checkpoints),
            "--batch",
            str(args.batch),
            "--cnn-batch",
            str(args.cnn_batch),
            "--steps",
            str(args.steps),
            "--candidates",
            str(args.candidates),
            "--overshoot",
            str(args.overshoot),
            "--models",
            *args.models,
        ]
        if args.chunk is not None:
            command += ["--chunk", str(args.chunk)]
        if baseline:
            command.append("--baseline")
        self.command = command
        self.proc = subprocess.Popen(
            command, env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.info = self._answer()  # waits until the worker has compiled everything

    def _answer(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"worker failed ({self.proc.returncode}): {' '.join(self.command)}")
        return json.loads(line)

    def time(self, what: str, name: str) -> float:
        self.proc.stdin.write(f"{what} {name}\n")
        self.proc.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _env(devices: int | None) -> dict[str, str]:
    """Environment of a CPU worker with ``devices`` forced host devices (None: any platform)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if devices is not None:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        env.pop("JAX_PLATFORMS", None)
    return env


def _gpu_count() -> int:
    """GPUs JAX sees in a fresh process (0 when there are none)."""
    code = "import jax; print(jax.default_backend(), jax.device_count())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(None), capture_output=True, text=True
    )
    if done.returncode != 0:
        return 0
    backend, count = done.stdout.split()[-2:]
    return int(count) if backend in ("gpu", "cuda", "rocm") else 0


def _train(args: argparse.Namespace, checkpoints: Path) -> dict[str, float]:
    """Train every model once (1 CPU device) into ``checkpoints``; the workers load it."""
    bgeom = import_bgeom()
    data = bgeom.data.load("digits")
    accuracy = {}
    for name in args.models:
        print(f"training {name} on digits (seed 0) ...", flush=True)
        trained = bgeom.train.fit(
            name, data, seeds=0, checkpoint_dir=checkpoints / name, progress=False
        )
        accuracy[name] = test_accuracy(trained)
    return accuracy


def _compare(m: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Labels, flips and margins of one run against the reference run."""
    a, b = np.asarray(m["margin"]), np.asarray(ref["margin"])
    finite = np.isfinite(a) & np.isfinite(b)
    rel = np.abs(a[finite] - b[finite]) / np.maximum(np.abs(b[finite]), 1e-12)
    out = {
        "labels_equal": m["label"] == ref["label"],
        "same_flips": bool(np.array_equal(np.isfinite(a), np.isfinite(b))),
        "max_relative_margin_difference": float(rel.max()) if rel.size else 0.0,
    }
    out["ok"] = bool(
        out["labels_equal"]
        and out["same_flips"]
        and out["max_relative_margin_difference"] < AGREEMENT_RTOL
    )
    return out


def _agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Margins and labels of every run (sweeps and bgeom.batched) against the 1-CPU-device sweep."""
    base = rows[0]
    out = {}
    for k, row in enumerate(rows):
        for name, m in row["result"]["models"].items():
            ref = base["result"]["models"][name]
            if k:
                out[f"{row['label']}/{name}"] = _compare(m, ref)
            out[f"{row['label']}/{name}/batched"] = _compare(m["engine"], ref)
    return out


def results_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | batch | devices | median (s) | samples/s | vs 1 device (x) "
        "| compile (s) | first call (s) | chunks x size (padding) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {n: m for n, m in results["runs"][0]["result"]["models"].items()}
    for name in results["config"]["models"]:
        for run in results["runs"]:
            m = run["result"]["models"][name]
            speed = base[name]["median_seconds"] / m["median_seconds"]
            lines.append(
                f"| {name} | {m['batch']} | {run['label']} | {fmt_seconds(m['median_seconds'])} "
                f"| {m['throughput_per_second']:.0f} | {speed:.2f} "
                f"| {fmt_seconds(m['compile_seconds'])} | {fmt_seconds(m['first_call_seconds'])} "
                f"| {m['chunks']} x {m['chunk_size']} ({m['padding']}) |"
            )
        for run in results["runs"]:
            e = run["result"]["models"][name]["engine"]
            speed = base[name]["median_seconds"] / e["median_seconds"]
            lines.append(
                f"| {name} | {base[name]['batch']} | {run['label']}, `bgeom.batched` "
                f"({e['devices_used']} device(s) held its {e['slots']} slots; work efficiency "
                f"{e['work_efficiency']:.2f}) | {fmt_seconds(e['median_seconds'])} "
                f"| {base[name]['batch'] / e['median_seconds']:.0f} | {speed:.2f} | - "
                f"| {fmt_seconds(e['first_call_seconds'])} | - |"
            )
        plain = base[name].get("jit_vmap")
        if plain:
            lines.append(
                f"| {name} | {base[name]['batch']} | 1 CPU, plain `jit(vmap)` "
                f"| {fmt_seconds(plain['median_seconds'])} "
                f"| {base[name]['batch'] / plain['median_seconds']:.0f} "
                f"| {base[name]['median_seconds'] / plain['median_seconds']:.2f} | - "
                f"| {fmt_seconds(plain['first_call_seconds'])} | - |"
            )
    return "\n".join(lines)


def render_section(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    ok = all(a["ok"] for a in results["agreement"].values())
    gpu = results["gpu"]
    lines = [
        f"- **Machine:** {machine_summary(m)}. Load average (1 min) at start / end: "
        f"{load_average(results)}.",
        versions_bullet(m, ("flax", "numpy")),
        "- **Work:** DeepFool margins (L2, "
        f"{cfg['steps']} steps, {cfg['candidates']} candidates, overshoot {cfg['overshoot']}, "
        "clipped to [0, 1]) of the first digits images (test images, then training "
        "images) for the MLP and the small CNN trained with `bgeom.train.fit(name, digits, "
        "seeds=0)` (test accuracy "
        + ", ".join(f"{k} {a:.3f}" for k, a in results["test_accuracy"].items())
        + "), as `bgeom.sweep(fn, params, x, in_axes=(None, 0)"
        + (f", batch_size={cfg['chunk']}" if cfg["chunk"] else "")
        + ")`.",
        "- **`bgeom.batched` rows:** the same searches as "
        "`bgeom.batched(bgeom.deepfool)(apply_fn, params, x, ...)` in the same worker: "
        "compaction (finished images leave), the slots split over the worker's devices "
        "(their count read from the slots' sharding, `EngineStats.devices`), the default "
        "width per device. Speed-ups are against the 1-device sweep.",
        "- **Devices:** each CPU row is a separate process started with "
        "`XLA_FLAGS=--xla_force_host_platform_device_count=D`, so D devices share this "
        f"machine's {m['usable_cores']} cores: more devices than cores cannot add compute, and "
        "the rows show the sharding overhead and scaling here, not that of D real "
        "accelerators.",
        f"- **Timing:** median of {cfg['repeats']} sweeps per row. The workers (one process per "
        "row) stay alive and the repeats alternate between them (1, 2, 4 devices, plain, "
        "1, 2, ...), so that changes in the machine's load hit every row alike; compile time "
        "and the first call (compile + run) are measured apart, with one worker compiling at a "
        "time. The last row per model is plain `jax.jit(jax.vmap(fn))` on one device, in the "
        "1-device worker, for the overhead of sweep itself (its margins equal the sweep's: "
        "max difference "
        + ", ".join(
            f"{n} {r['jit_vmap']['max_abs_margin_difference']:.1e}"
            for n, r in results["runs"][0]["result"]["models"].items()
        )
        + ").",
        "- **GPU:** "
        + (
            f"{gpu['count']} GPU(s) ({gpu['kind']}), rows labelled GPU."
            if gpu["count"]
            else "none was available to this run (no GPU machine was lent to the session "
            "that produced it), so there is no GPU row; the same command adds one on a "
            "machine where JAX sees a GPU."
        ),
        "- **Agreement:** labels, flips and margins of every run (`bgeom.batched` included) "
        "equal the 1-device sweep "
        f"(relative margin difference below {AGREEMENT_RTOL:g}): "
        + ("yes." if ok else "NO, see the JSON."),
        "",
        results_table(results),
    ]
    return generated_section(
        "sweep",
        "Sweeps over devices: `bgeom.sweep` and `bgeom.batched` on 1, 2 and 4 CPU devices",
        results,
        lines,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=512, help="MLP images per sweep")
    p.add_argument("--cnn-batch", type=int, default=64, help="CNN images per sweep")
    add_repeats(p, 3, "timed sweeps per row")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4], help="CPU device counts")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--chunk", type=int, default=None, help="sweep batch_size (default: all)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--overshoot", type=float, default=0.02)
    p.add_argument("--no-gpu", dest="gpu", action="store_false", help="skip the GPU check")
    add_output_options(p, "sweep")
    # Internal: a worker process.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoints", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if 1 not in args.devices and not args.worker:
        p.error("--devices must include 1 (the reference run)")
    return args


def _command(args: argparse.Namespace) -> str:
    words = ["--batch", str(args.batch), "--cnn-batch", str(args.cnn_batch)]
    words += ["--repeats", str(args.repeats)]
    words += ["--devices", *map(str, args.devices), "--models", *args.models]
    if args.chunk is not None:
        words += ["--chunk", str(args.chunk)]
    return command_line("bench_sweep.py", words)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker(args)
    load_start = os.getloadavg()[0]
    machine = machine_info(VERSIONS, with_jax=False)
    print(machine_line(machine), flush=True)
    labels, workers = [], []
    with tempfile.TemporaryDirectory(prefix="bgeom-bench-sweep-") as tmp:
        checkpoints = Path(tmp)
        accuracy = _train(args, checkpoints)
        gpus = _gpu_count() if args.gpu else 0
        gpu = {"count": gpus, "kind": None}
        try:
            # Started one after the other, so no compilation competes with another.
            for devices in sorted(set(args.devices)):
                print(f"starting the worker with {devices} CPU device(s) ...", flush=True)
                workers.append(_Spawned(args, checkpoints, _env(devices), devices == 1))
                labels.append(f"{devices} CPU")
            if gpus:
                print(f"starting the worker with {gpus} GPU(s) ...", flush=True)
                workers.append(_Spawned(args, checkpoints, _env(None), False))
                labels.append(f"{workers[-1].info['devices']} GPU")
                gpu["kind"] = workers[-1].info["device_kind"]
            times = {(i, name): [] for i in range(len(workers)) for name in args.models}
            engine = {(i, name): [] for i in range(len(workers)) for name in args.models}
            plain = {name: [] for name in args.models}
            for r in range(args.repeats):
                for name in args.models:
                    for i, w in enumerate(workers):
                        times[i, name].append(w.time("sweep", name))
                        engine[i, name].append(w.time("engine", name))
                    plain[name].append(workers[0].time("plain", name))
                    print(
                        f"repeat {r + 1}/{args.repeats} {name}: "
                        + ", ".join(
                            f"{lab} {times[i, name][-1]:.3f} s (batched "
                            f"{engine[i, name][-1]:.3f} s)"
                            for i, lab in enumerate(labels)
                        )
                        + f", plain jit(vmap) {plain[name][-1]:.3f} s",
                        flush=True,
                    )
        finally:
            for w in workers:
                w.close()
    runs = []
    for i, (label, w) in enumerate(zip(labels, workers, strict=True)):
        for name, m in w.info["models"].items():
            m["times_seconds"] = times[i, name]
            m["median_seconds"] = statistics.median(times[i, name])
            m["throughput_per_second"] = m["batch"] / m["median_seconds"]
            m["engine"]["times_seconds"] = engine[i, name]
            m["engine"]["median_seconds"] = statistics.median(engine[i, name])
            if "jit_vmap" in m:
                m["jit_vmap"]["times_seconds"] = plain[name]
                m["jit_vmap"]["median_seconds"] = statistics.median(plain[name])
        runs.append({"label": label, "result": w.info})
    config = {
        "batch": args.batch,
        "cnn_batch": args.cnn_batch,
        "repeats": args.repeats,
        "devices": args.devices,
        "models": args.models,
        "chunk": args.chunk,
        "steps": args.steps,
        "candidates": args.candidates,
        "overshoot": args.overshoot,
    }
    record = results_record("sweep", _command(args), config, machine, load_start)
    results = record | {"test_accuracy": accuracy, "gpu": gpu, "runs": runs}
    results["agreement"] = _agreement(runs)
    publish(results, args, "sweep", summary=results_table, render=render_section)
    bad = [k for k, a in results["agreement"].items() if not a["ok"]]
    if bad:
        print(f"margins disagree with the 1-device run: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
