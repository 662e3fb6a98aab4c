"""DeepFool: bgeom against what a user would otherwise run, on identical weights.

For each model of ``_models.py`` (default: the tanh MLP 784-256-256-256-10,
bgeom's LeNet and a conv net written in plain JAX, all at 28x28x1 and trained
here on digits resized to 28x28) the SAME batch of images (``--batch``, all
test images first, then training images) is attacked by:

- bgeom ``bgeom.batched(bgeom.deepfool)(apply_fn, params, x, bounds=(0, 1),
  candidates, overshoot, max_iter)``: every step one jitted call at the top
  level, finished images leave the batch (``bgeom.engine``);
- bgeom ``jax.jit(jax.vmap(lambda x: bgeom.deepfool(...)))``: one compiled
  ``lax.while_loop``, compiled ahead of time;
- foolbox 3.3.4 ``L2DeepFoolAttack(steps, candidates, overshoot)`` on the same
  JAX model (``foolbox.JAXModel(jax.jit(batched_logits), bounds=(0, 1))``);
- torchattacks 3.5.1 ``DeepFool(steps, overshoot)`` on a CPU PyTorch copy of
  the same weights (``_torch_models.py``), whose logits are checked against
  JAX's before anything is timed.

Labels are the model's own predictions. bgeom and foolbox run the same
algorithm (linearise at ``x0 + (1 + overshoot) r``, step ``|g| / ||w|| + 1e-4``,
clip to [0, 1]); torchattacks' variant has no ``1e-4`` and clips after every
step, so its margins agree less closely (``TORCHATTACKS_TOLERANCE``).

Timed repeats of all rows alternate (a busy machine slows every row alike);
the first call of each row (compilation, tracing, warm caches) is reported
apart. Per row: median time, images per second, the speed-up of bgeom's
batched row over it, flip rate (re-checked with the JAX model), the median
relative difference of its margins from the batched row's on the images both
flipped, work efficiency (useful steps / computed slot-steps) and time / floor.

The floor: ``EngineStats.steps`` (the useful DeepFool steps of the batched
row) times the top-level cost of one step per image, measured as ONE jitted,
vmapped call on the whole batch that does one step's work (a forward pass, the
candidates' gradient differences by one batched VJP, the step, and the forward
pass at the new point), divided by the batch size, or the same on as many
images as the engine's narrow CPU width (64, its default for conv nets),
whichever is cheaper per image (on a CPU a narrow step over conv-net
gradients can be). The clean forward pass that
picks each image's candidates is not in the floor. ``--no-probe`` skips the
second measurement of the same step inside a one-iteration ``lax.fori_loop``
(XLA:CPU compiles some convolution gradients worse inside loop bodies, where
``jit(vmap(deepfool))`` runs every step).

``--gpu``: where JAX sees a GPU, the bgeom rows and their floor are timed on
it as well (extra rows); the peers stay on the CPU.

Usage::

    python benchmarks/bench_deepfool.py [--batch 256 --repeats 3 --models mlp lenet jaxcnn] [--gpu]

Writes ``OUT/deepfool.json`` and rewrites the DeepFool section of
``BENCHMARKS.md`` (``--markdown``; ``--no-markdown`` leaves it alone).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
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
    median_time,
    publish,
    results_record,
    shown_path,
    timed,
    timed_compile,
    versions_bullet,
)

VERSIONS = (
    "jax",
    "jaxlib",
    "flax",
    "numpy",
    "foolbox",
    "eagerpy",
    "torch",
    "torchattacks",
    "bgeom",
)
AGREEMENT_TOLERANCE = 0.01  # median relative margin difference, same algorithm
TORCHATTACKS_TOLERANCE = 0.05  # its variant: no 1e-4 step, clipped after every step
DEFAULT_MODELS = ("mlp", "lenet", "jaxcnn")
ROWS = {
    "batched": "bgeom `batched(deepfool)`",
    "jit_vmap": "bgeom `jit(vmap(deepfool))`",
    "foolbox": "foolbox `L2DeepFoolAttack`, JAX model",
    "torchattacks": "torchattacks `DeepFool`, PyTorch copy",
}
PEERS = ("foolbox", "torchattacks")


# --------------------------------------------------------------------------- the floor


def step_functions(apply_fn: Callable, args: argparse.Namespace) -> tuple[Callable, Callable]:
    """One DeepFool step per image, and the clean candidates' cotangents, both vmapped.

    ``step(params, x, cotangents)`` does one step's work from ``x`` (as from
    any point of the search): forward pass and VJP at ``x``, the candidates'
    gradient differences from one VJP vmapped over the cotangent rows, the
    nearest linearised boundary, the step, and the label at the new overshot
    point (clipped to [0, 1]). Written here, not taken from bgeom's internals.
    """
    import jax
    import jax.numpy as jnp

    def cotangents(params, x):
        logits = apply_fn(params, x)
        k = min(args.candidates, logits.shape[0])
        _, order = jax.lax.top_k(logits, k)
        onehots = jax.nn.one_hot(order, logits.shape[0], dtype=logits.dtype)
        return onehots[1:] - onehots[0]

    def step(params, x, cot):
        f = lambda z: apply_fn(params, z)
        logits, vjp = jax.vjp(f, x)
        (w,) = jax.vmap(vjp)(cot)
        g = cot @ logits
        norm = jnp.sqrt(jnp.sum(jnp.square(w.reshape(w.shape[0], -1)), axis=1))
        pert = jnp.abs(g) / norm
        best = jnp.argmin(pert)
        r = (pert[best] + 1e-4) * w[best] / norm[best]
        z = jnp.clip(x + (1.0 + args.overshoot) * r, 0.0, 1.0)
        return jnp.argmax(f(z)), r

    vmapped = lambda fn: jax.vmap(fn, in_axes=(None, 0, 0))
    return vmapped(step), jax.vmap(cotangents, in_axes=(None, 0))


def measure_floor(model: Any, params: Any, x: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Top-level cost of one DeepFool step on the batch (and inside a loop unless --no-probe)."""
    import jax
    import jax.numpy as jnp

    step, cotangents = step_functions(model.apply_fn, args)
    cot = block(jax.jit(cotangents)(params, x))
    top = jax.jit(step)
    compile_s, top_c = timed_compile(top, params, x, cot)
    block(top_c(params, x, cot))
    seconds, times, _ = median_time(lambda: top_c(params, x, cot), args.floor_repeats)
    n = int(x.shape[0])
    out: dict[str, Any] = {
        "what": "one DeepFool step on the batch: forward + one VJP vmapped over the "
        f"{int(cot.shape[1])} candidate cotangents + step + forward at the new point",
        "batch_seconds": seconds,
        "batch_times": times,
        "per_image_seconds": seconds / n,
        "compile_seconds": compile_s,
    }
    # The same step on as many images as the engine's narrow CPU width
    # (default_batch_size(): 64, its width for conv nets): on a CPU a narrower
    # step can cost less per image. The floor takes the cheaper width.
    slots = import_bgeom().engine.default_batch_size()
    if slots < n:
        xs, cs = x[:slots], cot[:slots]
        narrow = top.lower(params, xs, cs).compile()
        block(narrow(params, xs, cs))
        narrow_s, _, _ = median_time(lambda: narrow(params, xs, cs), args.floor_repeats)
        out["slots"] = slots
        out["slots_per_image_seconds"] = narrow_s / slots
        out["per_image_seconds"] = min(seconds / n, narrow_s / slots)
    if args.probe:

        def looped(p, xb, c, count):
            def body(i, r):
                label, dr = step(p, jnp.clip(xb + r, 0.0, 1.0), c)
                # The label is used, so the forward pass at the new point stays in the loop.
                return r + 1e-3 * jnp.where((label >= 0)[:, None, None, None], dr, 0.0)

            return jax.lax.fori_loop(0, count, body, jnp.zeros_like(xb))

        loop = jax.jit(looped)
        one = jnp.asarray(1, jnp.int32)
        _, loop_c = timed_compile(loop, params, x, cot, one)
        block(loop_c(params, x, cot, one))
        in_loop, _, _ = median_time(lambda: loop_c(params, x, cot, one), args.floor_repeats)
        out["in_loop_batch_seconds"] = in_loop
        out["in_loop_over_top_level"] = in_loop / seconds
    return out


# --------------------------------------------------------------------------- the rows


class Row:
    """One way of running DeepFool on the batch: a callable and what it gave."""

    def __init__(self, key: str, device: str, call: Callable[[], Any]):
        self.key, self.device, self.call = key, device, call
        self.first_call_s = 0.0
        self.compile_s: float | None = None
        self.times: list[float] = []
        self.out: Any = None

    @property
    def name(self) -> str:
        return f"{self.key}_gpu" if self.device == "gpu" else self.key

    def first(self) -> None:
        self.first_call_s, self.out = timed(self.call)

    def repeat(self) -> float:
        seconds, self.out = timed(self.call)
        self.times.append(seconds)
        return seconds


def _device_context(device: Any) -> Any:
    import jax

    return jax.default_device(device) if device is not None else contextlib.nullcontext()


def bgeom_rows(
    model: Any, x_np: np.ndarray, device: Any, kind: str, args: argparse.Namespace
) -> list[Row]:
    """The two bgeom rows on ``device`` (``kind``: ``cpu`` or ``gpu``)."""
    import jax

    bgeom = import_bgeom()
    params = jax.device_put(model.params, device)
    x = jax.device_put(x_np, device)
    kw = dict(
        candidates=args.candidates,
        overshoot=args.overshoot,
        max_iter=args.steps,
        bounds=(0.0, 1.0),
    )
    batched = bgeom.batched(bgeom.deepfool)

    def run_batched():
        with _device_context(device):
            return batched(model.apply_fn, params, x, return_stats=True, **kw)

    vmapped = jax.jit(
        jax.vmap(lambda p, xi: bgeom.deepfool(model.apply_fn, p, xi, **kw), in_axes=(None, 0))
    )
    with _device_context(device):
        compile_s, compiled = timed_compile(vmapped, params, x)
    rows = [Row("batched", kind, run_batched), Row("jit_vmap", kind, lambda: compiled(params, x))]
    rows[1].compile_s = compile_s
    return rows


def peer_rows(model: Any, x_np: np.ndarray, labels: np.ndarray, cpu: Any, args) -> list[Row]:
    """foolbox on the JAX model and torchattacks on the PyTorch copy (both on the CPU)."""
    import foolbox as fb
    import jax
    import torch
    import torchattacks
    from _torch_models import to_nchw, to_nhwc

    params = jax.device_put(model.params, cpu)
    x = jax.device_put(x_np, cpu)
    logits = jax.jit(lambda xb: model.batched(params, xb))
    grad_calls = [0]

    def counted(xb):
        # foolbox differentiates the model once per candidate and step (on the whole batch).
        grad_calls[0] += isinstance(xb, jax.core.Tracer)
        return logits(xb)

    fmodel = fb.JAXModel(counted, bounds=(0.0, 1.0))
    attack = fb.attacks.L2DeepFoolAttack(
        steps=args.steps, candidates=args.candidates, overshoot=args.overshoot
    )
    criterion = fb.criteria.Misclassification(jax.device_put(labels, cpu))

    def run_foolbox():
        grad_calls[0] = 0
        with _device_context(cpu):
            adv = attack.run(fmodel, x, criterion)
        # Each full step takes candidates - 1 gradients; the last check takes one more.
        return adv, grad_calls[0] // (min(args.candidates, logits_count(model)) - 1)

    ta = torchattacks.DeepFool(model.torch, steps=args.steps, overshoot=args.overshoot)
    xt, lt = to_nchw(x_np), torch.from_numpy(labels.astype(np.int64))
    counts = {"calls": 0, "stops": 0}
    one_image = ta._forward_indiv

    def counted(image, label):
        # One call per image and step: a Jacobian and a step, or the test that stops it.
        early_stop, pre, adv = one_image(image, label)
        counts["calls"] += 1
        counts["stops"] += bool(early_stop)
        return early_stop, pre, adv

    ta._forward_indiv = counted

    def run_torchattacks():
        counts.update(calls=0, stops=0)
        adv = to_nhwc(ta(xt, lt))
        return adv, counts["calls"] - counts["stops"], counts["stops"]

    return [Row("foolbox", "cpu", run_foolbox), Row("torchattacks", "cpu", run_torchattacks)]


def logits_count(model: Any) -> int:
    """The number of classes (the last dense layer's width)."""
    return int(model.layers[-1][1].shape[1])


def adversarials(row: Row, x_np: np.ndarray) -> np.ndarray:
    """The adversarial images (NHWC NumPy) of a row's last output."""
    if row.key == "batched":
        return x_np + np.asarray(row.out[0].perturbation)
    if row.key == "jit_vmap":
        return x_np + np.asarray(row.out.perturbation)
    return np.asarray(row.out[0])


def lockstep_efficiency(iterations: Any) -> float:
    """Useful / computed steps of ``jit(vmap)``: every lane runs until the slowest stops."""
    it = np.asarray(iterations)
    return float(it.sum() / (it.size * max(int(it.max()), 1)))


def summarise(
    row: Row,
    x_np: np.ndarray,
    labels: np.ndarray,
    predict: Callable,
    reference: dict[str, Any] | None,
    floors: dict[str, dict[str, Any]],
    steps: int,
) -> dict[str, Any]:
    """A row's figures; ``reference`` is the CPU batched row's (None for that row itself)."""
    n = len(x_np)
    adv = adversarials(row, x_np)
    flipped = predict(adv) != labels
    margin = np.linalg.norm((adv - x_np).reshape(n, -1), axis=1).astype(np.float64)
    median = statistics.median(row.times)
    out: dict[str, Any] = {
        "label": ROWS[row.key],
        "device": row.device,
        "first_call_seconds": row.first_call_s,
        "times_seconds": row.times,
        "median_seconds": median,
        "images_per_second": n / median,
        "flip_rate": float(flipped.mean()),
        "in_bounds": bool(np.all((adv >= 0.0) & (adv <= 1.0))),
        "median_margin": float(np.median(margin[flipped])) if flipped.any() else None,
        "margins": margin.tolist(),
        "flipped": flipped.tolist(),
        "time_over_floor": median / (steps * floors[row.device]["per_image_seconds"]),
    }
    if row.compile_s is not None:
        out["compile_seconds"] = row.compile_s
    if row.key == "batched":
        result, stats = row.out
        out["engine_stats"] = stats._asdict()
        out["work_efficiency"] = stats.steps / stats.computed_steps
        out["converged_rate"] = float(np.mean(result.converged))
        out["iterations_mean"] = float(np.mean(result.iterations))
        out["iterations_max"] = int(np.max(result.iterations))
    elif row.key == "jit_vmap":
        out["work_efficiency"] = lockstep_efficiency(row.out.iterations)
        out["converged_rate"] = float(np.mean(np.asarray(row.out.converged)))
    elif row.key == "foolbox":
        # The whole batch takes every step until the last image flips. Same algorithm as
        # bgeom, so the same per-image steps are useful: the batched row's count.
        out["full_steps"] = int(row.out[1])
        out["work_efficiency"] = steps / (n * row.out[1]) if row.out[1] else None
    else:
        # One image at a time: only unfinished images are stepped (its own step count).
        _, own_steps, stops = row.out
        out["steps"] = int(own_steps)
        out["flips_detected_by_torchattacks"] = int(stops)
        out["work_efficiency"] = None
    if reference is not None:
        ref_margin = np.asarray(reference["margins"])
        both = flipped & np.asarray(reference["flipped"])
        rel = np.abs(margin[both] - ref_margin[both]) / np.maximum(ref_margin[both], 1e-12)
        out["speedup_of_batched"] = median / reference["median_seconds"]
        tolerance = TORCHATTACKS_TOLERANCE if row.key == "torchattacks" else AGREEMENT_TOLERANCE
        out["agreement"] = {
            "images_both_flipped": int(both.sum()),
            "median_relative_difference": float(np.median(rel)) if rel.size else None,
            "p95_relative_difference": float(np.percentile(rel, 95)) if rel.size else None,
            "max_relative_difference": float(rel.max()) if rel.size else None,
            "tolerance": tolerance,
            "ok": bool(rel.size and np.median(rel) < tolerance),
        }
    else:
        out["speedup_of_batched"] = 1.0
    return out


def bench_model(name: str, data: Any, x_np: np.ndarray, args, devices) -> dict[str, Any]:
    """Train ``name``, check its PyTorch copy, then time every row on ``x_np``."""
    import _models
    import jax
    import jax.numpy as jnp
    from _torch_models import check_logits, torch_copy

    cpu, gpu = devices
    print(f"[{name}] training ({_models.MODELS[name]}) ...", flush=True)
    model = _models.train(name, data)
    with _device_context(cpu):
        params = jax.device_put(model.params, cpu)
        logits_fn = jax.jit(lambda xb: model.batched(params, xb))
        logits = np.asarray(logits_fn(jax.device_put(x_np, cpu)))
    labels = logits.argmax(-1).astype(np.int32)
    model.torch = torch_copy(model.layers)
    copy_check = check_logits(model.torch, logits, x_np)
    print(
        f"[{name}] test accuracy {model.test_accuracy:.3f} "
        f"(trained in {model.train_seconds:.0f} s); PyTorch copy: max |logit difference| "
        f"{copy_check['max_abs_difference']:.1e}",
        flush=True,
    )
    result: dict[str, Any] = {
        "model": name,
        "description": model.description,
        "test_accuracy": model.test_accuracy,
        "train_seconds": model.train_seconds,
        "batch": len(x_np),
        "torch_copy": copy_check,
    }
    if not copy_check["ok"]:
        print(f"[{name}] the PyTorch copy's logits disagree; not timed", file=sys.stderr)
        result["skipped"] = "PyTorch copy disagrees with the JAX model"
        return result

    def predict(adv: np.ndarray) -> np.ndarray:
        with _device_context(cpu):
            return np.asarray(jnp.argmax(logits_fn(jax.device_put(adv, cpu)), -1))

    with _device_context(cpu):
        floors = {"cpu": measure_floor(model, params, jax.device_put(x_np, cpu), args)}
    rows = bgeom_rows(model, x_np, cpu, "cpu", args) + peer_rows(model, x_np, labels, cpu, args)
    if gpu is not None:
        with _device_context(gpu):
            floors["gpu"] = measure_floor(
                model, jax.device_put(model.params, gpu), jax.device_put(x_np, gpu), args
            )
        rows += bgeom_rows(model, x_np, gpu, "gpu", args)
    for kind, floor in floors.items():
        probe = (
            f"; inside fori_loop {floor['in_loop_over_top_level']:.2f}x that"
            if "in_loop_over_top_level" in floor
            else ""
        )
        print(
            f"[{name}] one step at top level ({kind}): {floor['batch_seconds']:.4f} s per batch, "
            f"{1e3 * floor['per_image_seconds']:.3f} ms per image{probe}",
            flush=True,
        )
    for row in rows:
        row.first()
        print(f"[{name}] {row.name}: first call {row.first_call_s:.2f} s", flush=True)
    for i in range(args.repeats):
        times = ", ".join(f"{row.name} {row.repeat():.3f} s" for row in rows)
        print(f"[{name}] repeat {i + 1}/{args.repeats}: {times}", flush=True)

    steps = rows[0].out[1].steps  # the CPU batched row's useful steps (fixed by the algorithm)
    summaries: dict[str, dict[str, Any]] = {}
    summaries["batched"] = summarise(rows[0], x_np, labels, predict, None, floors, steps)
    for row in rows[1:]:
        summaries[row.name] = summarise(
            row, x_np, labels, predict, summaries["batched"], floors, steps
        )
    for s in summaries.values():  # the per-image lists stay out of the results file
        s.pop("margins"), s.pop("flipped")
    result["floor"] = {kind: f | {"useful_steps": steps} for kind, f in floors.items()}
    for f in result["floor"].values():
        f["floor_seconds"] = steps * f["per_image_seconds"]
    result["rows"] = summaries
    if args.scale and name in args.scale_models:
        result["at_scale"] = at_scale(model, data, args, cpu, floors["cpu"]["per_image_seconds"])
    return result


def at_scale(model: Any, data: Any, args, cpu: Any, per_image_floor: float) -> dict[str, Any]:
    """The two bgeom rows on ``--scale`` images (bgeom only), against the same per-image floor.

    With more images than slots, finished images hand their slots to waiting
    ones: the regime ``bgeom.batched`` is built for. The peers are not rerun:
    torchattacks' cost per image does not depend on the count, and foolbox's
    lock-step batch only wastes more as the slowest image takes more steps.
    """
    x_np = first_images(data, args.scale, "--scale")
    print(f"[{model.name}] at scale: {len(x_np)} images, bgeom rows only ...", flush=True)
    rows = bgeom_rows(model, x_np, cpu, "cpu", args)
    for row in rows:
        row.first()
    for _ in range(args.repeats):
        for row in rows:
            row.repeat()
    _, stats = rows[0].out
    floor = stats.steps * per_image_floor
    out: dict[str, Any] = {"images": len(x_np), "useful_steps": stats.steps, "floor_seconds": floor}
    efficiency = {
        "batched": stats.work_efficiency,
        "jit_vmap": lockstep_efficiency(rows[1].out.iterations),
    }
    for row in rows:
        median = statistics.median(row.times)
        out[row.key] = {
            "first_call_seconds": row.first_call_s,
            "compile_seconds": row.compile_s,
            "times_seconds": row.times,
            "median_seconds": median,
            "images_per_second": len(x_np) / median,
            "work_efficiency": efficiency[row.key],
            "time_over_floor": median / floor,
        }
    out["batched"]["calls"] = stats.calls
    print(
        f"[{model.name}] at scale: batched {out['batched']['median_seconds']:.3f} s "
        f"({out['batched']['time_over_floor']:.2f}x floor, efficiency "
        f"{out['batched']['work_efficiency']:.2f}), jit(vmap) "
        f"{out['jit_vmap']['median_seconds']:.3f} s",
        flush=True,
    )
    return out


# --------------------------------------------------------------------------- output


def _fmt_rel(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _fmt_eff(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def results_table(results: dict[str, Any]) -> str:
    """Every timed row as a Markdown table (also printed to the terminal)."""
    rows = [
        "| model | row | device | first call (s) | median (s) | images/s "
        "| bgeom batched speed-up (x) | flipped | median rel. margin diff. (n) "
        "| work efficiency | time / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        if "rows" not in r:
            rows.append(f"| {r['model']} | not timed: {r['skipped']} |||||||||")
            continue
        for s in r["rows"].values():
            agreement = s.get("agreement")
            diff = (
                "reference"
                if agreement is None
                else f"{_fmt_rel(agreement['median_relative_difference'])} "
                f"({agreement['images_both_flipped']})"
            )
            first = fmt_seconds(s["first_call_seconds"])
            if "compile_seconds" in s:
                first = f"{fmt_seconds(s['compile_seconds'])} + {first}"
            rows.append(
                f"| {r['model']} | {s['label']} | {s['device'].upper()} | {first} "
                f"| {fmt_seconds(s['median_seconds'])} | {s['images_per_second']:.0f} "
                f"| {s['speedup_of_batched']:.2f} | {s['flip_rate']:.1%} | {diff} "
                f"| {_fmt_eff(s['work_efficiency'])} | {s['time_over_floor']:.2f} |"
            )
    return "\n".join(rows)


def floor_table(results: dict[str, Any]) -> str:
    """The floor of every model: one step at top level, useful steps, the floor."""
    rows = [
        "| model | test acc. | PyTorch copy max abs. logit diff. | device | one step, batch (s) "
        "| one step per image (ms) | useful steps | floor (s) | in `fori_loop` / top level |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        for kind, f in r.get("floor", {}).items():
            loop = f.get("in_loop_over_top_level")
            rows.append(
                f"| {r['model']} | {r['test_accuracy']:.3f} "
                f"| {r['torch_copy']['max_abs_difference']:.1e} | {kind.upper()} "
                f"| {f['batch_seconds']:.4f} | {1e3 * f['per_image_seconds']:.3f} "
                f"| {f['useful_steps']} | {fmt_seconds(f['floor_seconds'])} "
                f"| {'-' if loop is None else f'{loop:.2f}'} |"
            )
    return "\n".join(rows)


def scale_table(results: dict[str, Any]) -> str:
    """The bgeom rows on ``--scale`` images, where compaction refills slots."""
    rows = [
        "| model | images | row | first call (s) | median (s) | images/s | useful steps "
        "| floor (s) | work efficiency | time / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        s = r.get("at_scale")
        if not s:
            continue
        for key in ("batched", "jit_vmap"):
            row = s[key]
            first = fmt_seconds(row["first_call_seconds"])
            if row["compile_seconds"] is not None:
                first = f"{fmt_seconds(row['compile_seconds'])} + {first}"
            rows.append(
                f"| {r['model']} | {s['images']} | {ROWS[key]} | {first} "
                f"| {fmt_seconds(row['median_seconds'])} | {row['images_per_second']:.0f} "
                f"| {s['useful_steps']} | {fmt_seconds(s['floor_seconds'])} "
                f"| {row['work_efficiency']:.2f} | {row['time_over_floor']:.2f} |"
            )
    return "\n".join(rows) if len(rows) > 2 else ""


def verdicts(results: dict[str, Any]) -> list[str]:
    """One bullet per model, in words."""
    lines = []
    for r in results["models"]:
        if "rows" not in r:
            continue
        rows = r["rows"]
        b = rows["batched"]
        peers = ", ".join(
            f"{rows[k]['speedup_of_batched']:.1f}x {k}" for k in ("jit_vmap", *PEERS) if k in rows
        )
        agree = "; ".join(
            f"{k} {_fmt_rel(rows[k]['agreement']['median_relative_difference'])}"
            f"{'' if rows[k]['agreement']['ok'] else ' (NOT within tolerance)'}"
            for k in ("jit_vmap", *PEERS)
            if k in rows
        )
        line = (
            f"- **{r['model']}** ({r['description']}): bgeom batched takes "
            f"{fmt_seconds(b['median_seconds'])} s for {r['batch']} images, "
            f"{b['time_over_floor']:.2f}x its floor, work efficiency {b['work_efficiency']:.2f} "
            f"({b['engine_stats']['steps']} useful steps in {b['engine_stats']['calls']} calls, "
            f"{b['iterations_mean']:.2f} per image, at most {b['iterations_max']}); it is "
            f"{peers}. Median relative margin difference from it: {agree}."
        )
        if "torchattacks" in rows:
            t = rows["torchattacks"]
            line += (
                f" torchattacks' variant took {t['steps']} steps and saw "
                f"{t['flips_detected_by_torchattacks']} of {r['batch']} labels change (on its "
                f"PyTorch copy, one image at a time), but only {t['flip_rate']:.0%} of its "
                "points are adversarial to the JAX model: clipped after every step, with the "
                "overshoot on each step rather than on the whole perturbation, its searches "
                "creep up to the boundary and stop on it, where rounding decides the label."
            )
        if "foolbox" in rows and rows["foolbox"]["work_efficiency"] is not None:
            f = rows["foolbox"]
            line += (
                f" foolbox ran {f['full_steps']} full steps on the whole batch (work "
                f"efficiency {f['work_efficiency']:.2f})."
            )
        if "batched_gpu" in rows:
            g = rows["batched_gpu"]
            line += (
                f" On the GPU bgeom batched takes {fmt_seconds(g['median_seconds'])} s, "
                f"{g['time_over_floor']:.2f}x the GPU floor."
            )
        lines.append(line)
    return lines


def _scale_lines(results: dict[str, Any]) -> list[str]:
    table = scale_table(results)
    if not table:
        return []
    return [
        "",
        f"**At scale** (`--scale {results['config']['scale']}`): the two bgeom rows on the "
        "first that many images, so that finished images hand their slots to waiting "
        "ones, against the same per-image floor as above. The peers are not rerun: "
        "torchattacks' cost per image does not depend on the count, and foolbox's lock-step "
        "batch only wastes more as its slowest image takes more steps.",
        "",
        table,
    ]


def render_section(results: dict[str, Any]) -> str:
    """The generated DeepFool section of BENCHMARKS.md."""
    m, cfg = results["machine"], results["config"]
    gpu = cfg["gpu"]
    if gpu == "not requested":
        gpu_line = (
            "- **GPU:** not requested; with `--gpu` on a machine whose JAX sees a GPU the "
            "two bgeom rows and their floor are also timed there (the peers stay on the CPU)."
        )
    elif gpu == "none seen":
        gpu_line = "- **GPU:** `--gpu` was given but JAX saw no GPU: no GPU rows."
    else:
        gpu_line = f"- **GPU:** {gpu}: the bgeom rows marked GPU ran there; the peers on the CPU."
    lines = [
        f"- **Machine:** {machine_summary(m)}; JAX backend `{m['jax_backend']}`"
        + (f", `XLA_FLAGS={m['xla_flags']}`" if m["xla_flags"] else "")
        + f"; PyTorch on {cfg['torch_threads']} threads.",
        versions_bullet(m, ("flax", "numpy", "foolbox", "eagerpy", "torch", "torchattacks")),
        f"- **Load average** (1 min) at start / end of the run: {load_average(results)}.",
        f"- **Data:** {cfg['batch']} digits images resized to 28x28x1 (all test images first), "
        f"in [0, 1]. Models trained here on them ({cfg['epochs']} epochs of Adam 1e-3, batch "
        "64, seed 0): bgeom's models with `bgeom.train.fit`, the plain-JAX CNN by its own "
        "optax loop (trained, not random).",
        f"- **Attack:** DeepFool L2, at most {cfg['steps']} steps, {cfg['candidates']} "
        f"candidates, overshoot {cfg['overshoot']}, clipped to [0, 1]; labels are the model's "
        "own predictions. bgeom batched: `bgeom.batched(bgeom.deepfool)(apply_fn, params, x, "
        "bounds=(0.0, 1.0), ...)` (each step one top-level jitted call; finished images leave "
        "the batch). bgeom jit(vmap): `jax.jit(jax.vmap(lambda p, x: bgeom.deepfool(apply_fn, "
        "p, x, ...)))`, compiled ahead of time (compile + first run shown). foolbox: "
        "`L2DeepFoolAttack(...).run(foolbox.JAXModel(jax.jit(batched_logits), bounds=(0, 1)), "
        "x, Misclassification(labels))`, the same algorithm (its step loop is eager Python "
        "around the jitted model; every step runs the whole batch, one gradient per "
        "candidate). torchattacks: `torchattacks.DeepFool(torch_model, steps, overshoot)"
        "(x_nchw, labels)` on a PyTorch copy of the weights (one image at a time, one backward "
        "per class, all 10 classes); its variant has no `1e-4` in the step and clips after "
        "every step.",
        "- **PyTorch copies:** `nn.Linear` / `nn.Conv2d` / `F.max_pool2d` modules loaded with "
        "the JAX weights (`benchmarks/_torch_models.py`); their logits on the batch agree with "
        "JAX's to the max absolute difference in the floor table below (tolerance "
        "1e-5 relative to the largest logit) and every label agrees, checked before timing.",
        f"- **Timing:** median of {cfg['repeats']} repeats per row, all rows alternating; the "
        "first call (compilation, tracing) apart. Speed-up = the row's median / bgeom "
        "batched's (CPU) median. Margins `||x_adv - x||` are compared with bgeom batched's "
        "on the images both flipped (flips re-checked with the JAX model); tolerance "
        f"{AGREEMENT_TOLERANCE:.0%} on the median ({TORCHATTACKS_TOLERANCE:.0%} for "
        "torchattacks' variant).",
        "- **Work efficiency:** useful steps / slot-steps computed: `EngineStats.steps / "
        "computed_steps` for bgeom batched; for `jit(vmap)`, whose lanes all run until the "
        "slowest image stops, the sum of the images' steps / (batch x the most steps). "
        "foolbox runs the whole batch until the last image flips: bgeom's useful steps "
        "(the same algorithm takes the same steps per image) / (batch x its full steps, "
        "counted from its gradient calls). torchattacks steps only unfinished images, one at "
        "a time, so it wastes no slot (no figure); its own step count (calls of its per-image "
        "step but the one that sees the label changed) is in the bullets below.",
        "- **Floor:** useful steps (`EngineStats.steps` of bgeom batched) x the top-level cost "
        "of one step per image: one jitted, vmapped call on the whole batch doing one step's "
        "work (forward pass, the candidates' gradient differences by one batched VJP, the "
        "step, the forward pass at the new point) / batch size, or the same call on as many "
        "images as the engine's narrow CPU width (64, its default for conv nets) / that "
        "many, whichever is "
        f"cheaper per image; median of {cfg['floor_repeats']}. The clean forward pass that "
        "picks each image's candidates is outside the floor. Time / floor of every row "
        "uses that floor (GPU rows: the GPU "
        "floor). The last column is the same step inside a one-iteration `lax.fori_loop`, "
        "over the top-level call: what a step costs where `jit(vmap(deepfool))` runs it "
        "(bgeom batched runs every step at the top level). The earlier probe's variant with "
        "one separate VJP per candidate is dropped: the probe measures bgeom's step; the "
        "peers' ways of taking gradients are timed whole, in their rows.",
        gpu_line,
        "",
        results_table(results),
        "",
        floor_table(results),
        "",
        *verdicts(results),
        *_scale_lines(results),
    ]
    return generated_section(
        "deepfool",
        "DeepFool: bgeom vs foolbox and torchattacks on identical weights",
        results,
        lines,
        setup=(
            'pip install -e ".[bench]"',
            "pip install torch==2.13.0 && pip install --no-deps torchattacks==3.5.1",
        ),
    )


def terminal_summary(results: dict[str, Any]) -> str:
    """What is printed at the end of a run: both tables and the verdicts."""
    parts = [results_table(results), floor_table(results), "\n".join(verdicts(results))]
    return "\n\n".join(p for p in (*parts, scale_table(results)) if p)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, from the repository root."""
    defaults = parse_args([])
    words = ["--batch", str(args.batch), "--repeats", str(args.repeats), "--models", *args.models]
    for option in ("scale", "steps", "candidates", "overshoot", "floor_repeats"):
        if getattr(args, option) != getattr(defaults, option):
            words += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    if args.scale_models != defaults.scale_models:
        words += ["--scale-models", *args.scale_models]
    if args.gpu:
        words.append("--gpu")
    if args.out.resolve() != defaults.out.resolve():
        words += ["--out", shown_path(args.out)]
    if args.no_markdown:
        words.append("--no-markdown")
    elif args.markdown.resolve() != defaults.markdown.resolve():
        words += ["--markdown", shown_path(args.markdown)]
    if not args.probe:
        words.append("--no-probe")
    return command_line("bench_deepfool.py", words)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256, help="images per attack call")
    add_repeats(p, 3, "timed calls per row")
    add_repeats(p, 5, "timed calls of the one-step probe", flag="--floor-repeats")
    p.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        choices=["mlp", "lenet", "cnn", "jaxcnn"],
    )
    p.add_argument(
        "--scale",
        type=int,
        default=1797,
        help="also time the bgeom rows on this many images (0: skip; 1797: all digits)",
    )
    p.add_argument(
        "--scale-models",
        nargs="+",
        default=["mlp"],
        help="models timed at --scale (each costs about --scale / --batch times its rows)",
    )
    p.add_argument("--steps", type=int, default=50, help="DeepFool steps (max_iter)")
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--overshoot", type=float, default=0.02)
    p.add_argument(
        "--gpu", action="store_true", help="also time the bgeom rows on a GPU, if JAX sees one"
    )
    add_output_options(p, "deepfool", "DeepFool")
    p.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="skip timing the one-step probe inside a fori_loop",
    )
    return p.parse_args(argv)


def _devices(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The CPU device, the GPU device (or None) and what to say about the GPU."""
    import jax

    cpu = jax.devices("cpu")[0]
    if not args.gpu:
        return cpu, None, "not requested"
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        print("--gpu: JAX sees no GPU; only CPU rows", flush=True)
        return cpu, None, "none seen"
    return cpu, gpu, str(gpu.device_kind)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 1 if a copy, a margin or a flip check fails."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        import foolbox  # noqa: F401
        import torch
        import torchattacks  # noqa: F401
    except ImportError as e:
        print(
            f"{e.name} is missing: pip install -e '.[bench]', then pip install torch==2.13.0 "
            "and pip install --no-deps torchattacks==3.5.1",
            file=sys.stderr,
        )
        return 2
    import _models

    load_start = os.getloadavg()[0]
    data = _models.load_data()
    x_np = first_images(data, args.batch)
    machine = machine_info(VERSIONS)
    cpu, gpu, gpu_text = _devices(args)
    print(f"{machine_line(machine)}, torch threads {torch.get_num_threads()}; batch {len(x_np)}")
    models = [bench_model(name, data, x_np, args, (cpu, gpu)) for name in args.models]
    config = {
        "batch": len(x_np),
        "repeats": args.repeats,
        "floor_repeats": args.floor_repeats,
        "steps": args.steps,
        "candidates": args.candidates,
        "overshoot": args.overshoot,
        "bounds": [0.0, 1.0],
        "scale": args.scale,
        "scale_models": args.scale_models,
        "epochs": _models.EPOCHS,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_text,
    }
    record = results_record("deepfool", _command(args), config, machine, load_start)
    results = record | {"models": models}
    publish(
        results, args, "deepfool", summary=terminal_summary, render=render_section, what="DeepFool"
    )
    failed = []
    for r in models:
        if "rows" not in r:
            failed.append(f"{r['model']} (PyTorch copy)")
            continue
        for key, s in r["rows"].items():
            if not s["flip_rate"] or ("agreement" in s and not s["agreement"]["ok"]):
                failed.append(f"{r['model']} {key}")
    if failed:
        print(f"margins disagree or no flips for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
