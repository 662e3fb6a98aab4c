"""SparseFool: bgeom against torchattacks and the authors' algorithm in PyTorch, identical weights.

Usage::

    python benchmarks/bench_sparsefool.py [--samples 256 --peer-samples 32 --models mlp lenet]

For each model of ``_models.py`` (default: the tanh MLP 784-256-256-256-10 and
bgeom's LeNet, trained here with ``bgeom.train.fit`` on the digits resized to
28x28) SparseFool (lambda 3, epsilon 0.02, at most 20 outer iterations, each
boundary point from DeepFool with 10 candidates, overshoot 0.02 and 50 steps,
box [0, 1]) runs three ways on the same weights:

- bgeom: ONE call ``bgeom.batched(bgeom.sparsefool)(apply_fn, params, x)`` on
  the first ``--samples`` images (every outer iteration one jitted top-level
  call, finished images leave the batch); compile time apart (first call),
  median of ``--repeats`` calls. Also timed on exactly the peers' images;
- the authors' algorithm (docs/sparsefool.md), written here in CPU PyTorch on
  a copy of the weights (``_torch_models.py``, logits checked against JAX's
  first) and run one image at a time as their code does: a Python loop of
  outer iterations; in each, their DeepFool (a Python loop over steps, one
  backward pass per candidate class per step, the step ``max(pert, 1e-4)``,
  the label tested at the overshot point; then the normalised gradient of
  ``f_adv - f_label`` at the un-overshot point and the anchor ``x +
  lambda r``) and their greedy linear solver (a Python loop over coordinates,
  one per iteration, in order of ``|w_j|``). Their code imports
  ``torch.autograd.gradcheck.zero_gradients``, which PyTorch 1.9 removed; the
  port takes each class's gradient with ``torch.autograd.grad`` instead, the
  same backward passes. Timed once on the first ``--peer-samples`` images;
- torchattacks 3.5.1 ``SparseFool`` with its defaults (``steps=10, lam=3,
  overshoot=0.02``) on the same PyTorch copy and images, labels the model's
  own predictions. Its linear solver restarts from the ORIGINAL image at every
  step (the authors' continues from the last ``x_i``), its DeepFool is
  torchattacks' own (all classes, no ``1e-4``, clipped to [0, 1] at every
  step), and it stops after 10 steps rather than 20. Timed once.

Reported per row: time per image, the fooling rate (labels re-checked with the
JAX model), the median (and quartiles) of the fraction of pixels changed over
the fooled images, the median L2 norm, and bgeom's speed-up (peer time per
image / bgeom's; in brackets on the peers' images alone). The target: at least
100x the authors' algorithm with no more pixels changed.

Writes ``benchmarks/results/sparsefool.json`` (``--out`` changes the folder)
and rewrites the section between the markers in BENCHMARKS.md
(``--no-markdown``: not). Exits 1 when a PyTorch copy disagrees with its JAX
model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_VERSIONS,
    add_output_options,
    add_repeats,
    command_line,
    fmt_seconds,
    generated_section,
    import_bgeom,
    machine_info,
    machine_line,
    machine_summary,
    median_time,
    publish,
    results_record,
    shown_path,
    timed,
    versions_bullet,
)

#: The SparseFool settings every row uses (the authors' defaults).
LAMBDA, MAX_ITER, EPSILON = 3.0, 20, 0.02
DEEPFOOL = dict(candidates=10, overshoot=0.02, max_iter=50)
#: torchattacks' defaults.
TORCHATTACKS = dict(steps=10, lam=3, overshoot=0.02)
#: The target against the authors' algorithm.
TARGET_SPEEDUP = 100.0
VERSIONS = (*DEFAULT_VERSIONS, "torch", "torchattacks")
ROWS = {
    "bgeom": "bgeom `batched(sparsefool)`",
    "bgeom_peer_images": "bgeom, the peers' images",
    "reference": "authors' algorithm, PyTorch",
    "torchattacks": "torchattacks `SparseFool`",
}


# --------------------------------------------------------------------------- the authors' algorithm


def reference_deepfool(
    model, x, *, lambda_: float, candidates: int, overshoot: float, max_iter: int
):
    """The DeepFool inside the authors' SparseFool, for ONE image ``x`` (1, C, H, W).

    A Python loop over steps. At ``x + r`` (not overshot) every candidate
    class's gradient comes from a backward pass of its own; the step goes
    ``max(pert, 1e-4)`` along the unit gradient difference of the nearest
    linearised boundary, and the label is tested at ``x + (1 + overshoot) r``.
    Returns ``(normal, anchor)``: the unit gradient of ``f_adv - f_label`` at
    ``x + r`` and ``x + lambda_ r``; ``normal`` is ``None`` when the gradient
    vanishes (no label change within ``max_iter`` steps), where the authors'
    code would divide by zero.
    """
    import torch

    with torch.no_grad():
        logits = model(x)[0]
    order = torch.argsort(logits, descending=True)[:candidates].tolist()
    label = order[0]
    r_tot = torch.zeros_like(x)
    adv_label, steps = label, 0
    while adv_label == label and steps < max_iter:
        z = (x + r_tot).requires_grad_(True)
        fs = model(z)[0]
        grads = [
            torch.autograd.grad(fs[k], z, retain_graph=i + 1 < len(order))[0]
            for i, k in enumerate(order)
        ]
        best, best_w = float("inf"), None
        for i in range(1, len(order)):
            w_k = grads[i] - grads[0]
            norm_k = float(w_k.norm())
            f_k = float((fs[order[i]] - fs[label]).detach())
            pert_k = abs(f_k) / norm_k if norm_k > 0 else float("inf")
            if pert_k < best:
                best, best_w = pert_k, w_k
        if best_w is None:  # every gradient difference vanishes: no direction to step in
            break
        r_tot = r_tot + max(best, 1e-4) * best_w / best_w.norm()
        with torch.no_grad():
            adv_label = int(model(x + (1 + overshoot) * r_tot)[0].argmax())
        steps += 1
    z = (x + r_tot).requires_grad_(True)
    fs = model(z)[0]
    grad = torch.autograd.grad(fs[adv_label] - fs[label], z)[0]
    norm = float(grad.norm())
    return (grad / norm if norm > 0 else None), x + lambda_ * r_tot


def reference_linear_solver(x, normal, anchor, lb, ub):
    """The authors' greedy solver towards ``normal . (v - anchor) = 0`` inside ``[lb, ub]``.

    A Python loop: with ``f = normal . (x - anchor)`` and ``beta = 0.001
    sign(f)``, take the coordinate with the largest remaining ``|w_j|``, move it
    by ``max(|f + beta| / |w_j|, 1e-4) sign(w_j)``, clip to the box, drop it,
    until the sign of ``f`` changes or no coordinate is left.
    """
    import torch

    remaining = normal.clone().view(-1)
    plane = normal.view(-1)
    point = anchor.view(-1)
    x = x.clone()
    sign_start = float(torch.sign(torch.dot(plane, x.view(-1) - point)))
    beta = 0.001 * sign_start
    sign = sign_start
    while sign == sign_start and bool(torch.any(remaining != 0)):
        f = torch.dot(plane, x.view(-1) - point) + beta
        j = int(torch.argmax(remaining.abs()))
        step = torch.zeros_like(remaining)
        step[j] = torch.clamp(f.abs() / remaining[j].abs(), min=1e-4) * torch.sign(remaining[j])
        x = torch.clamp(x + step.view(x.shape), lb, ub)
        sign = float(torch.sign(torch.dot(plane, x.view(-1) - point)))
        remaining[step != 0] = 0
    return x


def reference_sparsefool(model, x0, lb, ub):
    """The authors' SparseFool of ONE image (1, C, H, W); ``(x_adv, outer iterations)``."""
    import torch

    with torch.no_grad():
        label = int(model(x0)[0].argmax())
    x_i, adv, adv_label, loops = x0.clone(), x0.clone(), label, 0
    while adv_label == label and loops < MAX_ITER:
        normal, anchor = reference_deepfool(model, x_i, lambda_=LAMBDA, **DEEPFOOL)
        if normal is None:
            break
        x_i = reference_linear_solver(x_i, normal, anchor, lb, ub)
        adv = torch.clamp(x0 + (1 + EPSILON) * (x_i - x0), lb, ub)
        with torch.no_grad():
            adv_label = int(model(adv)[0].argmax())
        loops += 1
    return adv, loops


def run_reference(torch_model, x_np: np.ndarray) -> dict[str, Any]:
    """The authors' algorithm on every image of ``x_np``, one at a time, timed as a whole."""
    import torch
    from _torch_models import to_nchw, to_nhwc

    images = to_nchw(x_np)
    lb, ub = torch.zeros_like(images[:1]), torch.ones_like(images[:1])
    reference_sparsefool(torch_model, images[:1], lb, ub)  # untimed: PyTorch warms up
    adv, loops = [], []
    start = time.perf_counter()
    for i in range(len(images)):
        a, n = reference_sparsefool(torch_model, images[i : i + 1], lb, ub)
        adv.append(a)
        loops.append(n)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "adv": to_nhwc(torch.cat(adv)), "iterations": np.array(loops)}


def run_torchattacks(torch_model, x_np: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """torchattacks' SparseFool (its defaults) on ``x_np`` with the model's labels, timed."""
    import torch
    import torchattacks
    from _torch_models import to_nchw, to_nhwc

    attack = torchattacks.SparseFool(torch_model, **TORCHATTACKS)
    images, target = to_nchw(x_np), torch.from_numpy(labels.astype(np.int64))
    attack(images[:1], target[:1])  # untimed: PyTorch warms up
    start = time.perf_counter()
    adv = attack(images, target)
    return {"seconds": time.perf_counter() - start, "adv": to_nhwc(adv)}


# --------------------------------------------------------------------------- one model


def outcome(x_np: np.ndarray, adv: np.ndarray, labels: np.ndarray, predict) -> dict[str, Any]:
    """Fooling rate (the JAX model's labels of ``adv``), pixels changed and L2 of ``adv - x``."""
    n = len(x_np)
    r = np.asarray(adv, np.float64) - np.asarray(x_np, np.float64)
    fooled = predict(adv) != labels
    pixels = np.mean(np.any(r != 0, axis=-1).reshape(n, -1), axis=1)
    l2 = np.linalg.norm(r.reshape(n, -1), axis=1)
    ok = pixels[fooled]
    return {
        "images": n,
        "fooling_rate": float(fooled.mean()),
        "median_pixels_changed": float(np.median(ok)) if ok.size else None,
        "pixels_changed_quartiles": np.quantile(ok, [0.25, 0.75]).tolist() if ok.size else None,
        "median_l2": float(np.median(l2[fooled])) if ok.size else None,
        "fooled": fooled,
        "pixels_changed": pixels,
    }


def bench_model(name: str, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    import _models
    import jax
    from _torch_models import check_logits, torch_copy

    bgeom = import_bgeom()
    print(f"[{name}] training ({_models.MODELS[name]}) ...", flush=True)
    model = _models.train(name, data)
    x_np = np.ascontiguousarray(data.x_test[: args.samples])
    k = min(args.peer_samples, len(x_np))
    logits_fn = jax.jit(lambda xb: model.batched(model.params, xb))
    logits = np.asarray(logits_fn(x_np))
    labels = logits.argmax(-1)

    def predict(adv):
        return np.asarray(logits_fn(np.asarray(adv, np.float32))).argmax(-1)

    torch_model = torch_copy(model.layers)
    copy_check = check_logits(torch_model, logits, x_np)
    result: dict[str, Any] = {
        "model": name,
        "description": model.description,
        "test_accuracy": model.test_accuracy,
        "samples": len(x_np),
        "peer_samples": k,
        "torch_copy": copy_check,
    }
    print(
        f"[{name}] test accuracy {model.test_accuracy:.3f}; PyTorch copy: max |logit "
        f"difference| {copy_check['max_abs_difference']:.1e}",
        flush=True,
    )
    if not copy_check["ok"]:
        print(f"[{name}] the PyTorch copy's logits disagree; not timed", file=sys.stderr)
        result["skipped"] = "PyTorch copy disagrees with the JAX model"
        return result

    run = bgeom.batched(bgeom.sparsefool)

    def call(images):
        return run(model.apply_fn, model.params, images, return_stats=True)

    first, _ = timed(lambda: call(x_np))
    median, times, (res, stats) = median_time(lambda: call(x_np), args.repeats)
    timed(lambda: call(x_np[:k]))  # the peers' batch size compiles its own buckets
    sub_median, sub_times, _ = median_time(lambda: call(x_np[:k]), args.repeats)
    rows: dict[str, dict[str, Any]] = {}
    rows["bgeom"] = outcome(x_np, x_np + np.asarray(res.perturbation), labels, predict) | {
        "first_call_seconds": first,
        "seconds": median,
        "times_seconds": times,
        "seconds_per_image": median / len(x_np),
        "median_iterations": float(np.median(res.iterations)),
        "max_iterations": int(np.max(res.iterations)),
        "status_counts": {
            s: int(np.sum(np.asarray(res.status) == i))
            for i, s in enumerate(bgeom.sparse.STATUS_NAMES)
        },
        "work_efficiency": stats.work_efficiency,
    }
    b = rows["bgeom"]
    rows["bgeom_peer_images"] = {
        "images": k,
        "seconds": sub_median,
        "times_seconds": sub_times,
        "seconds_per_image": sub_median / k,
    }
    print(
        f"[{name}] bgeom: first call {first:.1f} s, median {median:.3f} s for {len(x_np)} "
        f"images ({1e3 * b['seconds_per_image']:.2f} ms per image), fooling rate "
        f"{b['fooling_rate']:.1%}, median pixels changed {_pct(b['median_pixels_changed'])}",
        flush=True,
    )
    ref = run_reference(torch_model, x_np[:k])
    rows["reference"] = outcome(x_np[:k], ref["adv"], labels[:k], predict) | {
        "seconds": ref["seconds"],
        "seconds_per_image": ref["seconds"] / k,
        "median_iterations": float(np.median(ref["iterations"])),
        "max_iterations": int(np.max(ref["iterations"])),
    }
    ta = run_torchattacks(torch_model, x_np[:k], labels[:k])
    rows["torchattacks"] = outcome(x_np[:k], ta["adv"], labels[:k], predict) | {
        "seconds": ta["seconds"],
        "seconds_per_image": ta["seconds"] / k,
    }
    for key in ("reference", "torchattacks"):
        row = rows[key]
        row["speedup"] = row["seconds_per_image"] / b["seconds_per_image"]
        row["speedup_same_images"] = row["seconds"] / sub_median
        print(
            f"[{name}] {ROWS[key]}: {row['seconds']:.2f} s for {k} images "
            f"({1e3 * row['seconds_per_image']:.1f} ms per image, bgeom {row['speedup']:.0f}x), "
            f"fooling rate {row['fooling_rate']:.1%}, median pixels changed "
            f"{_pct(row['median_pixels_changed'])}",
            flush=True,
        )
    # Pixels on the peers' images that both bgeom and the authors' algorithm fooled.
    both = b["fooled"][:k] & rows["reference"]["fooled"]
    result["both_fooled"] = {
        "images": int(both.sum()),
        "bgeom_median_pixels_changed": _median(b["pixels_changed"][:k][both]),
        "reference_median_pixels_changed": _median(rows["reference"]["pixels_changed"][both]),
    }
    ref_pixels = rows["reference"]["median_pixels_changed"]
    result["target"] = {
        "speedup": TARGET_SPEEDUP,
        "speedup_met": rows["reference"]["speedup"] >= TARGET_SPEEDUP,
        "pixels_met": bool(
            ref_pixels is not None
            and b["median_pixels_changed"] is not None
            and b["median_pixels_changed"] <= ref_pixels
        ),
    }
    for row in rows.values():
        row.pop("fooled", None)
        row.pop("pixels_changed", None)
    result["rows"] = rows
    return result


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if values.size else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


# --------------------------------------------------------------------------- output


def table(results: dict[str, Any]) -> list[str]:
    rows = [
        "| model | test acc. | row | images | first call (s) | time (s) | per image (ms) "
        "| speed-up of bgeom (x) | fooling rate | median pixels changed (quartiles) "
        "| median L2 | outer iterations (median / max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        if "rows" not in r:
            rows.append(f"| {r['model']} | not timed: {r['skipped']} ||||||||||")
            continue
        acc = f"{r['test_accuracy']:.3f}"
        for key, row in r["rows"].items():
            first = fmt_seconds(row["first_call_seconds"]) if "first_call_seconds" in row else "-"
            if "speedup" in row:
                speed = f"{row['speedup']:.0f} (same images: {row['speedup_same_images']:.0f})"
            else:
                speed = "1"
            if "fooling_rate" in row:
                q = row["pixels_changed_quartiles"]
                pixels = _pct(row["median_pixels_changed"]) + (
                    f" ({q[0]:.1%}-{q[1]:.1%})" if q else ""
                )
                fooled = f"{row['fooling_rate']:.1%}"
                l2 = "-" if row["median_l2"] is None else f"{row['median_l2']:.2f}"
            else:
                pixels = fooled = l2 = "-"
            its = (
                f"{row['median_iterations']:.0f} / {row['max_iterations']}"
                if "median_iterations" in row
                else "-"
            )
            rows.append(
                f"| {r['model']} | {acc} | {ROWS[key]} | {row['images']} | {first} "
                f"| {fmt_seconds(row['seconds'])} | {1e3 * row['seconds_per_image']:.2f} "
                f"| {speed} | {fooled} | {pixels} | {l2} | {its} |"
            )
    return rows


def verdicts(results: dict[str, Any]) -> list[str]:
    lines = []
    for r in results["models"]:
        if "rows" not in r:
            continue
        b, ref, ta = r["rows"]["bgeom"], r["rows"]["reference"], r["rows"]["torchattacks"]
        t, both = r["target"], r["both_fooled"]
        met = t["speedup_met"] and t["pixels_met"]
        lines.append(
            f"- **{r['model']}** ({r['description']}): bgeom takes "
            f"{1e3 * b['seconds_per_image']:.2f} ms per image, {ref['speedup']:.0f}x faster than "
            f"the authors' algorithm in PyTorch ({1e3 * ref['seconds_per_image']:.0f} ms per "
            f"image; {ref['speedup_same_images']:.0f}x on its {ref['images']} images alone) and "
            f"{ta['speedup']:.0f}x faster than torchattacks ({1e3 * ta['seconds_per_image']:.0f} "
            f"ms per image). Fooling rate {b['fooling_rate']:.1%} / {ref['fooling_rate']:.1%} / "
            f"{ta['fooling_rate']:.1%} and median pixels changed "
            f"{_pct(b['median_pixels_changed'])} / {_pct(ref['median_pixels_changed'])} / "
            f"{_pct(ta['median_pixels_changed'])} (bgeom / authors' / torchattacks); on the "
            f"{both['images']} images both bgeom and the authors' algorithm fooled: "
            f"{_pct(both['bgeom_median_pixels_changed'])} against "
            f"{_pct(both['reference_median_pixels_changed'])}. Target (>= "
            f"{t['speedup']:.0f}x the authors' with no more pixels changed): "
            + ("met." if met else "NOT met.")
        )
    lines.append(
        "- torchattacks' `SparseFool` restarts its linear solver from the original image at "
        "every step, where the authors' algorithm (and bgeom) continue from the last `x_i`; it "
        "also uses its own DeepFool (all classes, no `1e-4`, clipped every step) and at most "
        f"{TORCHATTACKS['steps']} steps: its pixel counts are not the algorithm's."
    )
    return lines


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    return generated_section(
        "sparsefool",
        "SparseFool: bgeom vs torchattacks and the authors' algorithm on identical weights",
        results,
        [
            f"- **Machine:** {machine_summary(results['machine'])}; JAX backend "
            f"`{results['machine']['jax_backend']}`; PyTorch on {cfg['torch_threads']} threads. "
            f"Load average at start / end: {results['loadavg_start']:.2f} / "
            f"{results['loadavg_end']:.2f}.",
            versions_bullet(results["machine"], ("flax", "numpy", "torch", "torchattacks")),
            f"- **Task:** SparseFool (lambda {LAMBDA:g}, epsilon {EPSILON}, at most {MAX_ITER} "
            "outer iterations, DeepFool boundary points with 10 candidates, overshoot 0.02 and "
            "50 steps, box [0, 1]) on the first digits test images resized to 28x28; labels "
            "are the models' own predictions, and every row's fooling is re-checked with the "
            "JAX model. Models trained here (5 epochs of Adam, `benchmarks/_models.py`).",
            f"- **bgeom:** one call `bgeom.batched(bgeom.sparsefool)(apply_fn, params, x)` on "
            f"{cfg['samples']} images (each outer iteration one jitted top-level call; "
            f"finished images leave the batch); median of {cfg['repeats']} calls after the "
            "first (compiling) one. Also timed on the peers' images.",
            "- **The authors' algorithm (the reference):** written here in CPU PyTorch after "
            "docs/sparsefool.md, one image at a time: their DeepFool (a Python loop of steps, "
            "one backward pass per candidate class, step `max(pert, 1e-4)`, normal = the unit "
            "gradient of `f_adv - f_label` at the un-overshot point, anchor `x + 3 r`) and "
            "their greedy linear solver (a Python loop, one coordinate per iteration). Their "
            "code imports `zero_gradients`, which PyTorch 1.9 removed; the port takes each "
            "class's gradient with `torch.autograd.grad`, the same backward passes. Timed "
            f"once on the first {cfg['peer_samples']} images, after one untimed image.",
            "- **torchattacks:** `torchattacks.SparseFool(torch_model, steps=10, lam=3, "
            "overshoot=0.02)(x_nchw, labels)`, its defaults, on the same copy and images; "
            "timed once after one untimed image.",
            "- **PyTorch copies:** `benchmarks/_torch_models.py`, logits checked against JAX's "
            "(tolerance 1e-5 relative to the largest logit, every label equal) before timing.",
            "- **Speed-up** = the peer's time per image / bgeom's (over all its images; in "
            "brackets on the peers' images alone).",
            "",
            *table(results),
            "",
            *verdicts(results),
        ],
        setup=("pip install torch==2.13.0 && pip install --no-deps torchattacks==3.5.1",),
    )


def summary(results: dict[str, Any]) -> str:
    return "\n".join([*table(results), "", *verdicts(results)])


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, from the repository root."""
    defaults = parse_args([])
    words = [
        "--samples", str(args.samples), "--peer-samples", str(args.peer_samples),
        "--repeats", str(args.repeats), "--models", *args.models,
    ]  # fmt: skip
    if args.out.resolve() != defaults.out.resolve():
        words += ["--out", shown_path(args.out)]
    if args.no_markdown:
        words.append("--no-markdown")
    elif args.markdown.resolve() != defaults.markdown.resolve():
        words += ["--markdown", shown_path(args.markdown)]
    return command_line("bench_sparsefool.py", words)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256, help="images for bgeom")
    p.add_argument(
        "--peer-samples",
        type=int,
        default=32,
        help="images for the authors' algorithm and torchattacks (the first of --samples)",
    )
    add_repeats(p, 3, "timed bgeom calls")
    p.add_argument(
        "--models", nargs="+", default=["mlp", "lenet"], choices=["mlp", "lenet", "cnn", "jaxcnn"]
    )
    add_output_options(p, "sparsefool", "SparseFool")
    args, _ = p.parse_known_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import torch
        import torchattacks  # noqa: F401
    except ImportError as e:
        print(
            f"{e.name} is missing: pip install torch==2.13.0 and "
            "pip install --no-deps torchattacks==3.5.1",
            file=sys.stderr,
        )
        return 2
    import _models

    load_start = os.getloadavg()[0]
    data = _models.load_data()
    if not 1 <= args.samples <= len(data.x_test):
        raise SystemExit(f"--samples must be between 1 and {len(data.x_test)}")
    if args.peer_samples < 1:
        raise SystemExit("--peer-samples must be >= 1")
    machine = machine_info(VERSIONS)
    print(f"{machine_line(machine)}, torch threads {torch.get_num_threads()}", flush=True)
    models = [bench_model(name, data, args) for name in args.models]
    config = {
        "samples": args.samples,
        "peer_samples": min(args.peer_samples, args.samples),
        "repeats": args.repeats,
        "lambda": LAMBDA,
        "max_iter": MAX_ITER,
        "epsilon": EPSILON,
        "deepfool": DEEPFOOL,
        "torchattacks": TORCHATTACKS,
        "epochs": _models.EPOCHS,
        "torch_threads": torch.get_num_threads(),
    }
    record = results_record("sparsefool", _command(args), config, machine, load_start)
    results = record | {"models": models}
    publish(results, args, "sparsefool", summary=summary, render=render, what="SparseFool")
    failed = [r["model"] for r in models if "rows" not in r]
    if failed:
        print(f"PyTorch copy disagrees for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
