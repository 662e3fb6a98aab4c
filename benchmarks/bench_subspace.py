"""Margins along subspaces: bgeom's one jitted call against a per-sample loop.

Usage::

    python benchmarks/bench_subspace.py [--samples 256] [--loop-samples 4] [--models mlp lenet]

For each model (trained here on digits resized to 28x28 with the default
recipe, 5 epochs) it computes the subspace-DeepFool margins of ``--samples``
test images along all 21 diagonal 8x8 DCT blocks (the "Hold me tight!" grid)
with ``bgeom.subspace_margins`` (one jitted call; compile time reported apart,
median of ``--repeats`` runs), and with a loop written the way the reference
implementation does it: one image and one block at a time, eager (no jit),
one backward pass per candidate class per step. The loop is timed on the first
``--loop-samples`` images (all 21 blocks) and its throughput in (image, block)
pairs per second is compared with bgeom's: timing it on all 256 x 21 pairs would
take hours. Margins are compared on the pairs both computed. Writes
``benchmarks/results/subspace.json`` (``--out`` changes the folder) and rewrites
the section between the markers in BENCHMARKS.md (``--no-markdown``: not).
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
    add_output_options,
    add_repeats,
    brief_machine_bullet,
    generated_section,
    median_time,
    publish,
    run_record,
    test_accuracy,
    timed,
)

TARGET_RATIO = 50.0


def reference_loop(apply_fn, params, x, subspace, *, candidates, overshoot, max_iter):
    """Subspace DeepFool for ONE image and ONE subspace, eager, one gradient per class.

    A transcription of the reference PyTorch code's structure: Python loop over
    steps, a separate backward pass for every candidate class at every step.
    """
    import jax
    import jax.numpy as jnp

    f = lambda z: apply_fn(params, z)
    logits0 = np.asarray(f(x))
    order = np.argsort(-logits0)[:candidates]
    k0 = order[0]
    r = jnp.zeros_like(x)
    k = k0
    i = 0
    while k == k0 and i < max_iter:
        z = x + (1 + overshoot) * r
        logits = f(z)
        grad_k0 = jax.grad(lambda v: f(v)[k0])(z)
        best, best_w = np.inf, None
        for c in order[1:]:
            grad_c = jax.grad(lambda v, c=c: f(v)[c])(z)
            w = subspace.project(grad_c - grad_k0)
            g = float(logits[c] - logits[k0])
            norm = float(jnp.linalg.norm(w))
            pert = abs(g) / norm if norm > 0 else np.inf
            if pert < best:
                best, best_w = pert, w / norm
        if not np.isfinite(best):
            break
        r = r + (best + 1e-4) * best_w
        k = int(np.argmax(np.asarray(f(x + (1 + overshoot) * r))))
        i += 1
    margin = float(jnp.linalg.norm((1 + overshoot) * r)) if k != k0 else np.inf
    return margin


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import jax.numpy as jnp

    import bgeom
    from bgeom import data, train
    from bgeom import subspaces as S

    ds = data.load("digits", size=28)
    result = train.fit(name, ds, config=train.recipe("default", epochs=5), progress=False)
    f, p = result.apply_fn, result.params
    x = jnp.asarray(ds.x_test[: args.samples])
    blocks = S.dct_blocks((28, 28, 1), 8, 1)
    kw = dict(candidates=10, overshoot=0.02, max_iter=100)
    call = lambda: bgeom.subspace_margins(f, p, x, blocks, **kw)
    first, grid = timed(call)
    bgeom_s, times, _ = median_time(call, args.repeats)
    pairs = x.shape[0] * len(blocks)

    m = min(args.loop_samples, x.shape[0])
    loop_margins = np.full((m, len(blocks)), np.inf)
    start = time.perf_counter()
    for i in range(m):
        for j in range(len(blocks)):
            loop_margins[i, j] = reference_loop(f, p, x[i], blocks[j], **kw)
    loop_s = time.perf_counter() - start
    loop_pairs = m * len(blocks)

    ours = np.asarray(grid.margin[:m])
    both = np.isfinite(ours) & np.isfinite(loop_margins)
    rel = np.abs(ours[both] - loop_margins[both]) / loop_margins[both]
    return {
        "model": name,
        "test_accuracy": test_accuracy(result),
        "pairs": pairs,
        "bgeom_first_call_s": first,
        "bgeom_median_s": bgeom_s,
        "bgeom_times_s": times,
        "bgeom_pairs_per_s": pairs / bgeom_s,
        "loop_pairs": loop_pairs,
        "loop_s": loop_s,
        "loop_pairs_per_s": loop_pairs / loop_s,
        "speedup": (pairs / bgeom_s) / (loop_pairs / loop_s),
        "flipped_fraction": float(np.mean(np.asarray(grid.converged))),
        "agreement_pairs": int(both.sum()),
        "median_relative_difference": float(np.median(rel)) if rel.size else None,
        "max_relative_difference": float(np.max(rel)) if rel.size else None,
        "median_margin_per_block": np.median(np.asarray(grid.margin), 0).round(3).tolist(),
    }


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    rows = [
        "| model | test acc. | pairs | bgeom first call | bgeom median | bgeom pairs/s "
        "| loop pairs timed | loop pairs/s | speed-up | median / max rel. diff. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        rows.append(
            f"| {r['model']} | {r['test_accuracy']:.3f} | {r['pairs']} "
            f"| {r['bgeom_first_call_s']:.2f} s | {r['bgeom_median_s']:.2f} s "
            f"| {r['bgeom_pairs_per_s']:.0f} | {r['loop_pairs']} | {r['loop_pairs_per_s']:.2f} "
            f"| **{r['speedup']:.0f}x** | {r['median_relative_difference']:.1e} / "
            f"{r['max_relative_difference']:.1e} |"
        )
    verdicts = [
        f"- **{r['model']}:** {r['speedup']:.0f}x the per-sample loop, "
        f"{'meeting' if r['speedup'] >= TARGET_RATIO else 'BELOW'} the {TARGET_RATIO:.0f}x "
        f"target; {r['flipped_fraction']:.1%} of the {r['pairs']} (image, block) searches "
        "flipped the label within 100 steps."
        for r in results["models"]
    ]
    return generated_section(
        "subspace",
        "Margins along subspaces: bgeom vs a per-sample loop",
        results,
        [
            brief_machine_bullet(results),
            f"- **Task:** subspace-DeepFool margins (10 candidates, overshoot 0.02, max 100 "
            f"steps) of {cfg['samples']} digits test images (resized to 28x28) along all 21 "
            "diagonal 8x8 DCT blocks; models trained here (default recipe, 5 epochs).",
            "- **bgeom:** one call `bgeom.subspace_margins(apply_fn, params, x, "
            "dct_blocks((28, 28, 1), 8, 1))` (jit over a vmap over images and blocks); "
            f"median of {cfg['repeats']} runs after the first (compiling) call.",
            "- **Loop:** the reference implementation's structure, eager: one image and one "
            "block at a time, a Python loop over steps, one `jax.grad` per candidate class per "
            f"step. Timed on the first {cfg['loop_samples']} images x 21 blocks; speed-up = "
            "bgeom pairs/s / loop pairs/s. Margins compared on those pairs.",
            "",
            *rows,
            "",
            *verdicts,
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--loop-samples", type=int, default=4)
    add_repeats(parser, 3)
    parser.add_argument("--models", nargs="+", default=["mlp"], help="mlp, lenet, cnn")
    add_output_options(parser, "subspace")
    args, _ = parser.parse_known_args(argv)
    load0 = os.getloadavg()[0]
    models = []
    for name in args.models:
        r = bench_model(name, args)
        print(
            f"{name}: bgeom {r['bgeom_pairs_per_s']:.0f} pairs/s (first call "
            f"{r['bgeom_first_call_s']:.1f}s), loop {r['loop_pairs_per_s']:.2f} pairs/s, "
            f"speed-up {r['speedup']:.0f}x, median rel. diff {r['median_relative_difference']}",
            flush=True,
        )
        models.append(r)
    results = run_record("bench_subspace.py", args, argv, load0) | {"models": models}
    publish(results, args, "subspace", summary=render, render=render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
