"""Margins along subspaces: bgeom's ``subspace_margins`` against the reference style in PyTorch.

Usage::

    python benchmarks/bench_subspace.py [--samples 256 --loop-samples 16 --models mlp lenet] [--gpu]

For each model of ``_models.py`` (default: the tanh MLP 784-256-256-256-10
and bgeom's LeNet, trained here on digits resized to 28x28) the subspace-
DeepFool margins (10 candidates, overshoot 0.02, at most 100 steps, no
clipping: the paper's setting) of the first ``--samples`` test images along
all 21 diagonal 8x8 DCT blocks of "Hold me tight!" are computed two ways, on
identical weights:

- bgeom: ONE call ``bgeom.subspace_margins(apply_fn, params, x,
  dct_blocks((28, 28, 1), 8, 1))`` (each image's first linearisation shared by
  its 21 blocks, the rest through ``bgeom.engine``); compile time apart
  (first call), median of ``--repeats`` calls;
- the reference implementation's style, written here in CPU PyTorch on a copy
  of the weights (``_torch_models.py``, logits checked against JAX's first):
  one image and one block at a time, a Python loop over steps, one backward
  pass per candidate class at every step, each gradient difference projected
  with a dense D x d DCT basis of the block (D = 784, d = 64). It is timed on
  the first ``--loop-samples`` images x 21 blocks (timing all pairs would take
  hours); bgeom is also timed on exactly those pairs.

Reported: time per (image, block) pair, the speed-up (reference time per pair
/ bgeom's, over all pairs and on the reference's pairs alone), the agreement
of the margins on the pairs both flipped, and bgeom's time / floor. The floor
is the useful subspace steps (``EngineStats.steps`` of the pair searches:
the sum of the pairs' iterations minus their first, which comes from the
shared linearisation) times the top-level cost of one subspace step per pair,
plus each image's shared first linearisation, plus every pair's first step
from that linearisation: each measured as ONE jitted, vmapped call at the top
level (a batch of 256 pairs doing one step: forward pass, the candidates'
gradient differences by one batched VJP, their DCTs, the block's masked
coefficients, the step with one inverse DCT and the forward pass at the new
point; all images doing a forward pass, the batched VJP and the DCTs; 256
pairs masking their image's shared coefficients, stepping and doing the
forward pass at the new point), divided by its batch; the pair probes also on
as many pairs as the engine's narrow CPU width (64), the cheaper per pair
counted. The projections are counted at their cheapest known cost (one DCT
per gradient, one inverse DCT per step), the way bgeom computes them.

``--gpu``: where JAX sees a GPU, bgeom's call and its floor are timed there as
well; the reference stays on the CPU. No eager-JAX loop is timed: per-op
dispatch makes any ratio against it large without saying anything about the
computation (it was the baseline of earlier versions of this script).

Writes ``benchmarks/results/subspace.json`` (``--out`` changes the folder) and
rewrites the section between the markers in BENCHMARKS.md (``--no-markdown``: not).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_output_options,
    add_repeats,
    brief_machine_bullet,
    fmt_seconds,
    generated_section,
    import_bgeom,
    median_time,
    publish,
    run_record,
    timed,
    timed_compile,
)

SEARCH = dict(candidates=10, overshoot=0.02, max_iter=100)
BLOCK, STRIDE = 8, 1
AGREEMENT_TOLERANCE = 0.01  # median relative margin difference
PROBE_PAIRS = 256  # pairs per floor probe (also timed on the engine's narrow CPU width, 64)


# --------------------------------------------------------------------------- the reference


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: row k is the k-th cosine atom of length n."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


def dense_block_bases(shape: tuple[int, int, int]) -> list[np.ndarray]:
    """For each diagonal block, its D x d orthonormal basis in NCHW-flattened pixels."""
    h, w, c = shape
    rows, cols = dct_matrix(h), dct_matrix(w)
    bases = []
    for s in range(0, min(h, w) - BLOCK + 1, STRIDE):
        atoms = []
        for u in range(s, s + BLOCK):
            for v in range(s, s + BLOCK):
                atom = np.outer(rows[u], cols[v])
                for ch in range(c):
                    image = np.zeros((c, h, w))
                    image[ch] = atom
                    atoms.append(image.ravel())
        bases.append(np.stack(atoms, axis=1).astype(np.float32))
    return bases


def reference_subspace_deepfool(model, x, basis, *, candidates, overshoot, max_iter):
    """Subspace DeepFool of ONE image (1, C, H, W) in ONE subspace (dense basis D x d).

    In the reference code's style: a Python loop over steps; at every step one
    forward pass and one backward pass per candidate class; each gradient
    difference projected as ``B (B^T w)``; the step ``(|g| / ||w|| + 1e-4) w / ||w||``
    towards the nearest linearised boundary; the label tested at
    ``x + (1 + overshoot) r`` (also where the next step linearises). Returns
    ``(margin, steps)`` with ``margin = inf`` when the label did not change.
    """
    import torch

    with torch.no_grad():
        logits0 = model(x)[0]
    order = torch.argsort(logits0, descending=True)[:candidates].tolist()
    k0 = order[0]
    r = torch.zeros_like(x)
    label, steps = k0, 0
    while label == k0 and steps < max_iter:
        z = (x + (1 + overshoot) * r).requires_grad_(True)
        fs = model(z)[0]
        grads = [
            torch.autograd.grad(fs[k], z, retain_graph=i + 1 < len(order))[0].reshape(-1)
            for i, k in enumerate(order)
        ]
        best, best_w, best_norm = float("inf"), None, 0.0
        for i in range(1, len(order)):
            w = basis @ (basis.T @ (grads[i] - grads[0]))
            g = (fs[order[i]] - fs[k0]).item()
            norm = float(torch.linalg.vector_norm(w))
            pert = abs(g) / norm if norm > 0 else float("inf")
            if pert < best:
                best, best_w, best_norm = pert, w, norm
        if not np.isfinite(best):
            break
        r = r + ((best + 1e-4) / best_norm) * best_w.reshape(x.shape)
        with torch.no_grad():
            label = int(model(x + (1 + overshoot) * r)[0].argmax())
        steps += 1
    margin = float(torch.linalg.vector_norm((1 + overshoot) * r)) if label != k0 else np.inf
    return margin, steps


def run_reference(torch_model, x_np: np.ndarray, bases: list[np.ndarray]) -> dict[str, Any]:
    """The reference loop over every (image, block) pair of ``x_np``, timed as a whole."""
    import torch
    from _torch_models import to_nchw

    images = to_nchw(x_np)
    tbases = [torch.from_numpy(b) for b in bases]
    margins = np.full((len(x_np), len(bases)), np.inf)
    steps = np.zeros((len(x_np), len(bases)), np.int64)
    # One untimed pair first (PyTorch's first backward passes allocate and warm up).
    reference_subspace_deepfool(torch_model, images[:1], tbases[0], **SEARCH)
    start = time.perf_counter()
    for i in range(len(x_np)):
        for j, basis in enumerate(tbases):
            margins[i, j], steps[i, j] = reference_subspace_deepfool(
                torch_model, images[i : i + 1], basis, **SEARCH
            )
    return {"seconds": time.perf_counter() - start, "margins": margins, "steps": steps}


# --------------------------------------------------------------------------- the floor


def _device_context(device: Any) -> Any:
    import jax

    return jax.default_device(device) if device is not None else contextlib.nullcontext()


def measure_floor(apply_fn, params, x, blocks, repeats: int) -> dict[str, Any]:
    """Top-level cost of one subspace step per pair and of one first linearisation per image."""
    import jax
    import jax.numpy as jnp

    def cotangents(xi):
        logits = apply_fn(params, xi)
        _, order = jax.lax.top_k(logits, min(SEARCH["candidates"], logits.shape[0]))
        onehots = jax.nn.one_hot(order, logits.shape[0], dtype=logits.dtype)
        return onehots[1:] - onehots[0]

    def linearise(p, xi, cot):
        # Forward pass, the candidates' gradients by one batched VJP, and their
        # DCTs (what every block of the image shares).
        logits, vjp = jax.vjp(lambda z: apply_fn(p, z), xi)
        (w,) = jax.vmap(vjp)(cot)
        return cot @ logits, jax.vmap(blocks.analyse)(w)

    def advance(p, xi, g, t, subspace):
        # Given an analysed linearisation: the block's coordinates, the step
        # (one inverse DCT) and the label at the new point.
        c = jax.vmap(subspace.coordinates)(t)
        norm = jnp.sqrt(jnp.sum(jnp.square(c.reshape(c.shape[0], -1)), axis=1))
        pert = jnp.abs(g) / norm
        best = jnp.argmin(pert)
        r = subspace.synthesise((pert[best] + 1e-4) * c[best] / norm[best])
        label = jnp.argmax(apply_fn(p, xi + (1.0 + SEARCH["overshoot"]) * r))
        return label, r

    def sub_step(p, xi, cot, subspace):
        return advance(p, xi, *linearise(p, xi, cot), subspace)

    n, m = x.shape[0], len(blocks)
    slots = import_bgeom().engine.default_batch_size()
    cot = jax.block_until_ready(jax.jit(jax.vmap(cotangents))(x))
    pairs = min(PROBE_PAIRS, n * m)
    images, which = np.arange(pairs) // m, np.arange(pairs) % m  # the engine's pair order
    px, pcot = x[images], cot[images]
    psub = jax.tree.map(lambda a: a[which], blocks)
    g, w = jax.block_until_ready(jax.jit(jax.vmap(linearise, (None, 0, 0)))(params, px, pcot))
    out: dict[str, Any] = {"probe_pairs": pairs, "images": n}
    for name, fn, fn_args, count in (
        ("step", jax.vmap(sub_step, in_axes=(None, 0, 0, 0)), (params, px, pcot, psub), pairs),
        ("first", jax.vmap(linearise, in_axes=(None, 0, 0)), (params, x, cot), n),
        ("advance", jax.vmap(advance, in_axes=(None, 0, 0, 0, 0)), (params, px, g, w, psub), pairs),
    ):
        _, compiled = timed_compile(jax.jit(fn), *fn_args)
        jax.block_until_ready(compiled(*fn_args))
        seconds, _, _ = median_time(lambda c=compiled, a=fn_args: c(*a), repeats)
        out[f"{name}_batch_seconds"] = seconds
        out[f"{name}_seconds_each"] = seconds / count
        if name != "first" and slots < count:
            # As many pairs as the engine's slots: on a CPU a narrow step can cost
            # less per pair. The floor takes the cheaper width.
            narrow_args = jax.tree.map(lambda a: a[:slots], fn_args[1:])
            narrow = jax.jit(fn).lower(params, *narrow_args).compile()
            jax.block_until_ready(narrow(params, *narrow_args))
            narrow_s, _, _ = median_time(lambda c=narrow, a=narrow_args: c(params, *a), repeats)
            out[f"{name}_slots_seconds_each"] = narrow_s / slots
            out[f"{name}_seconds_each"] = min(seconds / count, narrow_s / slots)
    return out


# --------------------------------------------------------------------------- one model


def time_bgeom(model, x_np, blocks, device, repeats: int) -> dict[str, Any]:
    """``subspace_margins`` on ``device``: first call, median of ``repeats``, the margins."""
    import jax

    bgeom = import_bgeom()
    params = jax.device_put(model.params, device)
    x = jax.device_put(x_np, device)
    subspaces = jax.device_put(blocks, device)

    def call():
        with _device_context(device):
            return bgeom.subspace_margins(model.apply_fn, params, x, subspaces, **SEARCH)

    first, grid = timed(call)
    median, times, grid = median_time(call, repeats)
    iterations = np.asarray(grid.iterations)
    return {
        "first_call_seconds": first,
        "median_seconds": median,
        "times_seconds": times,
        "margins": np.asarray(grid.margin, np.float64),
        "converged": np.asarray(grid.converged),
        "iterations": iterations,
        # The first step of every pair comes from its image's shared linearisation (at
        # init); the engine's steps (EngineStats.steps) are the rest.
        "engine_steps": int(iterations.sum() - np.count_nonzero(iterations)),
    }


def bench_model(name: str, data: Any, args: argparse.Namespace, devices) -> dict[str, Any]:
    import _models
    import jax
    from _torch_models import check_logits, torch_copy

    from bgeom import subspaces as S

    cpu, gpu = devices
    print(f"[{name}] training ({_models.MODELS[name]}) ...", flush=True)
    model = _models.train(name, data)
    x_np = np.ascontiguousarray(data.x_test[: args.samples])
    n = len(x_np)
    blocks = S.dct_blocks(data.shape, BLOCK, STRIDE)
    m = len(blocks)
    with _device_context(cpu):
        logits = np.asarray(jax.jit(model.batched)(jax.device_put(model.params, cpu), x_np))
    torch_model = torch_copy(model.layers)
    copy_check = check_logits(torch_model, logits, x_np)
    result: dict[str, Any] = {
        "model": name,
        "description": model.description,
        "test_accuracy": model.test_accuracy,
        "images": n,
        "blocks": m,
        "pairs": n * m,
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

    runs = {"cpu": (cpu, "cpu")} | ({"gpu": (gpu, "gpu")} if gpu is not None else {})
    bgeom_rows: dict[str, dict[str, Any]] = {}
    for kind, (device, _) in runs.items():
        with _device_context(device):
            floor = measure_floor(
                model.apply_fn,
                jax.device_put(model.params, device),
                jax.device_put(x_np, device),
                jax.device_put(blocks, device),
                args.floor_repeats,
            )
        row = time_bgeom(model, x_np, blocks, device, args.repeats)
        floor["useful_steps"] = row["engine_steps"]
        # The useful steps, each image's shared linearisation, and every pair's first step
        # from it (projection, step, forward pass at the new point).
        floor["floor_without_first_advance_seconds"] = (
            row["engine_steps"] * floor["step_seconds_each"] + n * floor["first_seconds_each"]
        )
        floor["floor_seconds"] = (
            floor["floor_without_first_advance_seconds"] + n * m * floor["advance_seconds_each"]
        )
        row["floor"] = floor
        row["time_over_floor"] = row["median_seconds"] / floor["floor_seconds"]
        row["seconds_per_pair"] = row["median_seconds"] / (n * m)
        bgeom_rows[kind] = row
        print(
            f"[{name}] bgeom ({kind}): first call {row['first_call_seconds']:.1f} s, median "
            f"{row['median_seconds']:.2f} s, {1e3 * row['seconds_per_pair']:.3f} ms per pair, "
            f"{row['time_over_floor']:.2f}x the floor ({floor['floor_seconds']:.2f} s)",
            flush=True,
        )

    # The reference on the first --loop-samples images, and bgeom (CPU) on the same pairs.
    k = min(args.loop_samples, n)
    ref = run_reference(torch_model, x_np[:k], dense_block_bases(data.shape))
    subset = time_bgeom(model, x_np[:k], blocks, cpu, args.repeats)
    ref_per_pair = ref["seconds"] / (k * m)
    ref_steps = int(ref["steps"].sum())
    print(
        f"[{name}] reference: {k} x {m} pairs in {ref['seconds']:.1f} s, "
        f"{1e3 * ref_per_pair:.2f} ms per pair ({ref_steps} steps); bgeom on those pairs "
        f"{subset['median_seconds']:.3f} s",
        flush=True,
    )

    cpu_row = bgeom_rows["cpu"]
    ours = cpu_row["margins"][:k]
    both = np.isfinite(ours) & np.isfinite(ref["margins"])
    rel = np.abs(ours[both] - ref["margins"][both]) / ref["margins"][both]
    agreement = {
        "pairs_both_flipped": int(both.sum()),
        "pairs_compared": k * m,
        "flipped_only_by_one": int(np.sum(np.isfinite(ours) != np.isfinite(ref["margins"]))),
        "median_relative_difference": float(np.median(rel)) if rel.size else None,
        "max_relative_difference": float(np.max(rel)) if rel.size else None,
        "tolerance": AGREEMENT_TOLERANCE,
        "ok": bool(rel.size and np.median(rel) < AGREEMENT_TOLERANCE),
    }
    for row in bgeom_rows.values():
        row["flipped_fraction"] = float(row["converged"].mean())
        row["median_margin_per_block"] = np.median(row["margins"], 0).round(3).tolist()
        row["iterations_mean"] = float(row["iterations"].mean())
        for key in ("margins", "converged", "iterations"):
            row.pop(key)
    result |= {
        "bgeom": bgeom_rows,
        "bgeom_on_reference_pairs": {
            "median_seconds": subset["median_seconds"],
            "times_seconds": subset["times_seconds"],
            "seconds_per_pair": subset["median_seconds"] / (k * m),
            "steps": int(subset["iterations"].sum()),
        },
        "reference": {
            "images": k,
            "pairs": k * m,
            "seconds": ref["seconds"],
            "seconds_per_pair": ref_per_pair,
            "steps": ref_steps,
            "seconds_per_step": ref["seconds"] / max(ref_steps, 1),
            "flipped_fraction": float(np.isfinite(ref["margins"]).mean()),
        },
        "speedup": ref_per_pair / cpu_row["seconds_per_pair"],
        "speedup_same_pairs": ref["seconds"] / subset["median_seconds"],
        "agreement": agreement,
    }
    return result


# --------------------------------------------------------------------------- output


def _rel(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def table(results: dict[str, Any]) -> list[str]:
    rows = [
        "| model | test acc. | row | device | pairs | first call (s) | median (s) "
        "| per pair (ms) | speed-up of bgeom (x) | flipped | time / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        if "bgeom" not in r:
            rows.append(f"| {r['model']} | not timed: {r['skipped']} ||||||||||")
            continue
        acc = f"{r['test_accuracy']:.3f}"
        for kind, b in r["bgeom"].items():
            rows.append(
                f"| {r['model']} | {acc} | bgeom `subspace_margins` | {kind.upper()} "
                f"| {r['pairs']} | {fmt_seconds(b['first_call_seconds'])} "
                f"| {fmt_seconds(b['median_seconds'])} | {1e3 * b['seconds_per_pair']:.3f} "
                f"| 1 | {b['flipped_fraction']:.1%} | {b['time_over_floor']:.2f} |"
            )
        s, ref = r["bgeom_on_reference_pairs"], r["reference"]
        rows.append(
            f"| {r['model']} | {acc} | bgeom, the reference's pairs | CPU | {ref['pairs']} | - "
            f"| {fmt_seconds(s['median_seconds'])} | {1e3 * s['seconds_per_pair']:.3f} "
            "| 1 | - | - |"
        )
        rows.append(
            f"| {r['model']} | {acc} | reference style, PyTorch | CPU | {ref['pairs']} | - "
            f"| {fmt_seconds(ref['seconds'])} | {1e3 * ref['seconds_per_pair']:.2f} "
            f"| {r['speedup']:.0f} (same pairs: {r['speedup_same_pairs']:.0f}) "
            f"| {ref['flipped_fraction']:.1%} | - |"
        )
    return rows


def floor_rows(results: dict[str, Any]) -> list[str]:
    rows = [
        "| model | device | one step, probe pairs (s) | per pair-step (ms) | first linearisation "
        "per image (ms) | first step from it, per pair (ms) | useful steps | floor (s) "
        "| reference per step (ms) | PyTorch copy max abs. logit diff. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        for kind, b in r.get("bgeom", {}).items():
            f = b["floor"]
            rows.append(
                f"| {r['model']} | {kind.upper()} | {f['step_batch_seconds']:.4f} "
                f"({f['probe_pairs']}) "
                f"| {1e3 * f['step_seconds_each']:.3f} | {1e3 * f['first_seconds_each']:.3f} "
                f"| {1e3 * f['advance_seconds_each']:.3f} "
                f"| {f['useful_steps']} | {fmt_seconds(f['floor_seconds'])} "
                f"| {1e3 * r['reference']['seconds_per_step']:.2f} "
                f"| {r['torch_copy']['max_abs_difference']:.1e} |"
            )
    return rows


def verdicts(results: dict[str, Any]) -> list[str]:
    lines = []
    for r in results["models"]:
        if "bgeom" not in r:
            continue
        b, a, ref = r["bgeom"]["cpu"], r["agreement"], r["reference"]
        lines.append(
            f"- **{r['model']}** ({r['description']}): one `subspace_margins` call, "
            f"{fmt_seconds(b['median_seconds'])} s for {r['pairs']} pairs "
            f"({1e3 * b['seconds_per_pair']:.3f} ms per pair, {b['time_over_floor']:.2f}x its "
            f"floor, {b['iterations_mean']:.1f} steps per pair on average), has "
            f"{r['speedup']:.0f}x the throughput of the PyTorch reference style "
            f"({1e3 * ref['seconds_per_pair']:.1f} ms per pair on its {ref['pairs']} pairs; "
            f"{r['speedup_same_pairs']:.0f}x on those pairs alone). Margins agree "
            f"{'within' if a['ok'] else 'NOT within'} tolerance: median / max relative "
            f"difference {_rel(a['median_relative_difference'])} / "
            f"{_rel(a['max_relative_difference'])} over {a['pairs_both_flipped']} pairs both "
            f"flipped ({a['flipped_only_by_one']} flipped by one only); "
            f"{b['flipped_fraction']:.1%} of bgeom's searches flipped within 100 steps."
        )
        if "gpu" in r["bgeom"]:
            g = r["bgeom"]["gpu"]
            lines.append(
                f"  On the GPU: {fmt_seconds(g['median_seconds'])} s, "
                f"{g['time_over_floor']:.2f}x the GPU floor."
            )
    return lines


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    gpu = results["gpu"]
    if gpu == "not requested":
        gpu_line = (
            "- **GPU:** not requested; with `--gpu` on a machine whose JAX sees a GPU, "
            "bgeom's call and its floor are also timed there (the reference stays on the CPU)."
        )
    elif gpu == "none seen":
        gpu_line = "- **GPU:** `--gpu` was given but JAX saw no GPU: no GPU rows."
    else:
        gpu_line = f"- **GPU:** {gpu}: the bgeom rows marked GPU ran there."
    return generated_section(
        "subspace",
        "Margins along subspaces: bgeom vs the reference style in PyTorch",
        results,
        [
            brief_machine_bullet(results)
            + f" PyTorch {results['torch_version']} on {results['torch_threads']} threads.",
            f"- **Task:** subspace-DeepFool margins (10 candidates, overshoot 0.02, at most 100 "
            f"steps, no clipping) of {cfg['samples']} digits test images resized to 28x28 "
            "along all 21 diagonal 8x8 DCT blocks; models trained here (5 epochs of Adam, "
            "`benchmarks/_models.py`).",
            "- **bgeom:** one call `bgeom.subspace_margins(apply_fn, params, x, "
            "dct_blocks((28, 28, 1), 8, 1))`: each image's first linearisation and the DCTs "
            "of its gradients are shared by its 21 blocks, every step synthesises only the "
            "step it takes (one inverse DCT), the rest runs through `bgeom.engine` "
            "(top-level jitted steps, finished pairs leave the batch); "
            f"median of {cfg['repeats']} calls after the first "
            "(compiling) one. Also timed on exactly the reference's pairs.",
            "- **Reference style (the peer):** CPU PyTorch on a copy of the weights whose "
            "logits match JAX's (last column below): one image and one block at a time, a "
            "Python loop over steps, one backward pass per candidate class per step, each "
            "gradient difference projected with the block's dense 784 x 64 DCT basis "
            "(`B (B^T w)`), the same step rule and stopping test as bgeom. Timed once on the "
            f"first {cfg['loop_samples']} images x 21 blocks, after one untimed pair. Speed-up "
            "= reference time per pair / bgeom's (over all pairs; in brackets on the "
            "reference's pairs alone). No eager-JAX loop is timed: per-op dispatch would "
            "make any ratio against it large without measuring the computation.",
            "- **Floor:** useful subspace steps (`EngineStats.steps` of the pair searches: "
            "their iterations minus the first, which starts from the shared linearisation) x "
            "the top-level cost of one subspace step per pair (one jitted, vmapped call on the "
            "probe pairs, 256 or all when fewer: forward pass, the candidates' gradient "
            "differences by one batched VJP, their DCTs, the block's masked coefficients, the "
            "step with one inverse DCT, the forward pass at the new point; / the probe pairs, or "
            "the same on 64 pairs, the engine's narrow CPU width, if cheaper per pair), "
            "plus the images x one first linearisation per image (forward pass, batched VJP, "
            "the DCTs; one call on all images), plus the pairs x the first step of a pair from "
            "that shared linearisation (its masked coefficients, the step, the forward pass at "
            "the new point; one call on the probe pairs). The last "
            "term is work every pair does; where most "
            "searches end after one step (the tanh MLP) it is most of the floor. Medians of "
            f"{cfg['floor_repeats']} calls; the JSON also holds the floor without it.",
            gpu_line,
            "",
            *table(results),
            "",
            *floor_rows(results),
            "",
            *verdicts(results),
        ],
        setup=("pip install torch==2.13.0",),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="images for bgeom")
    parser.add_argument("--loop-samples", type=int, default=16, help="images for the reference")
    add_repeats(parser, 3)
    add_repeats(parser, 5, "timed calls of each floor probe", flag="--floor-repeats")
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "lenet"], choices=["mlp", "lenet", "cnn", "jaxcnn"]
    )
    parser.add_argument(
        "--gpu", action="store_true", help="also time bgeom on a GPU, if JAX sees one"
    )
    add_output_options(parser, "subspace")
    args, _ = parser.parse_known_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is missing: pip install torch==2.13.0", file=sys.stderr)
        return 2
    import _models
    import jax

    load0 = os.getloadavg()[0]
    data = _models.load_data()
    if not 1 <= args.samples <= len(data.x_test):
        raise SystemExit(f"--samples must be between 1 and {len(data.x_test)}")
    cpu, gpu, gpu_text = jax.devices("cpu")[0], None, "not requested"
    if args.gpu:
        try:
            gpu = jax.devices("gpu")[0]
            gpu_text = str(gpu.device_kind)
        except RuntimeError:
            print("--gpu: JAX sees no GPU; only CPU rows", flush=True)
            gpu_text = "none seen"
    models = [bench_model(name, data, args, (cpu, gpu)) for name in args.models]
    results = run_record("bench_subspace.py", args, argv, load0) | {
        "models": models,
        "gpu": gpu_text,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    publish(results, args, "subspace", summary=render, render=render)
    bad = [r["model"] for r in models if "agreement" not in r or not r["agreement"]["ok"]]
    if bad:
        print(f"margins disagree (or copy failed) for: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
