"""Borderline search: bgeom's vectorised bisection against the reference style in PyTorch.

Usage::

    python benchmarks/bench_borderline.py [--pairs 1000 --loop-pairs 200 --models mlp cnn]

For each model of ``_models.py`` (default: the tanh MLP 784-256-256-256-10 and
bgeom's CNN, trained here on digits resized to 28x28) ``--pairs`` segments
``[a, b]`` between images the model labels differently (drawn at random, seed
0, from the test and then the training images) are bisected onto the boundary
between their two labels (DeepDIG's phase III, docs/borderline.md: stop when
``|p_s - p_t| < 1e-4``, fail on a midpoint of a third class), two ways, on
identical weights:

- bgeom: ``jax.jit(jax.vmap(bgeom.borderline_search))`` over all pairs in one
  call, and ``bgeom.borderline.borderline_searches`` (the chunked map the
  suite uses: 256 pairs per compiled call); compile time apart (first call),
  median of ``--repeats`` calls;
- the reference code's style, written here in CPU PyTorch on a copy of the
  weights (``_torch_models.py``, logits checked against JAX's first): one pair
  at a time, a Python loop over halvings, each one three single-image forward
  passes (both ends and the midpoint, as the reference recomputes the ends'
  probabilities every time) with the probabilities moved to NumPy. The
  reference has no cap on the halvings; this copy stops at ``--max-halvings``
  like bgeom, so that a pair it could never settle ends. It is timed on the
  first ``--loop-pairs`` pairs (all of them would take minutes); bgeom is also
  timed on exactly those pairs.

Reported: time per pair, the speed-up (reference time per pair / bgeom's), the
agreement of outcomes, halvings and points on the reference's pairs, and
bgeom's time / floor. The floor is the forward passes the bisections need
(two ends per pair, in one batched call, plus one per halving) times the
top-level cost of one forward pass in a batch of all pairs (one jitted,
vmapped call of the model). Under ``vmap`` every pair runs as many halvings
as the slowest; the work efficiency (useful / computed forward passes) says
how much that costs.

Writes ``benchmarks/results/borderline.json`` (``--out`` changes the folder) and
rewrites its section of BENCHMARKS.md (``--no-markdown``: not), as every benchmark does.
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
    fmt_seconds,
    generated_section,
    import_bgeom,
    median_time,
    publish,
    run_record,
    timed,
    timed_compile,
)

TOL = 1e-4
TARGET_SPEEDUP = 50.0
# Outcomes that agree on at least this fraction of the reference's pairs pass.
AGREEMENT = 0.95


# --------------------------------------------------------------------------- the reference


def reference_search(model, x1, x2, class1, class2, tol, cap):
    """Bisect ONE segment in the reference code's style; ``(point, status, attempts)``.

    ``x1``, ``x2``: (C, H, W) tensors labelled ``class1`` and ``class2``. Each
    halving runs the model on ``x1``, ``x2`` and their midpoint, one image at a
    time, and compares NumPy probabilities; a midpoint of a third class fails,
    a gap below ``tol`` succeeds, otherwise the end of the midpoint's label
    moves there. Stops after ``cap`` halvings (the reference has no cap).
    """
    import torch
    import torch.nn.functional as F

    attempts = 0
    with torch.no_grad():
        while True:
            middle = (x1 + x2) / 2
            attempts += 1
            probs_x1 = F.softmax(model(x1.unsqueeze(0)), dim=1).numpy().ravel()
            probs_x2 = F.softmax(model(x2.unsqueeze(0)), dim=1).numpy().ravel()
            probs_m = F.softmax(model(middle.unsqueeze(0)), dim=1).numpy().ravel()
            pred_x1, pred_x2, pred_m = (int(np.argmax(p)) for p in (probs_x1, probs_x2, probs_m))
            if pred_m != class1 and pred_m != class2:
                return middle, "third_class", attempts
            if abs(probs_m[class1] - probs_m[class2]) < tol:
                return middle, "converged", attempts
            if pred_m == pred_x1:
                x1 = middle
            if pred_m == pred_x2:
                x2 = middle
            if attempts >= cap:
                return middle, "max_halvings", attempts


def run_reference(torch_model, a, b, labels_a, labels_b, tol, cap) -> dict[str, Any]:
    """The reference loop over every pair, timed as a whole (after one untimed pair)."""
    from _torch_models import to_nchw, to_nhwc

    ta, tb = to_nchw(a), to_nchw(b)
    reference_search(torch_model, ta[0], tb[0], int(labels_a[0]), int(labels_b[0]), tol, cap)
    points, statuses, attempts = [], [], []
    start = time.perf_counter()
    for i in range(len(a)):
        point, status, n = reference_search(
            torch_model, ta[i], tb[i], int(labels_a[i]), int(labels_b[i]), tol, cap
        )
        points.append(point)
        statuses.append(status)
        attempts.append(n)
    seconds = time.perf_counter() - start
    import torch

    return {
        "seconds": seconds,
        "points": to_nhwc(torch.stack(points)),
        "status": statuses,
        "attempts": np.array(attempts),
    }


# --------------------------------------------------------------------------- bgeom


def draw_pairs(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random index pairs (seed 0) of images with different labels."""
    rng = np.random.default_rng(0)
    first = rng.integers(len(images), size=4 * n)
    second = rng.integers(len(images), size=4 * n)
    keep = labels[first] != labels[second]
    if keep.sum() < n:
        raise SystemExit("too few pairs of differently labelled images; lower --pairs")
    return first[keep][:n], second[keep][:n]


def time_bgeom(model, a, b, max_halvings, repeats) -> dict[str, Any]:
    """``jit(vmap(borderline_search))`` and ``borderline_searches`` on the pairs (a, b)."""
    import jax

    import_bgeom()
    from bgeom import borderline as bl

    search = jax.jit(
        jax.vmap(
            lambda p, x1, x2: bl.borderline_search(
                model.apply_fn, p, x1, x2, tol=TOL, max_halvings=max_halvings
            ),
            in_axes=(None, 0, 0),
        )
    )
    compile_seconds, compiled = timed_compile(search, model.params, a, b)
    median, times, res = median_time(lambda: compiled(model.params, a, b), repeats)

    def chunked():
        return bl.borderline_searches(
            model.apply_fn, model.params, a, b, tol=TOL, max_halvings=max_halvings
        )

    first, _ = timed(chunked)
    chunked_median, chunked_times, chunked_res = median_time(chunked, repeats)
    same = all(
        np.allclose(np.asarray(getattr(res, f)), np.asarray(getattr(chunked_res, f)))
        for f in ("point", "status", "halvings")
    )
    return {
        "compile_seconds": compile_seconds,
        "median_seconds": median,
        "times_seconds": times,
        "chunked_first_call_seconds": first,
        "chunked_median_seconds": chunked_median,
        "chunked_times_seconds": chunked_times,
        "chunked_equals_vmap": bool(same),
        "result": {f: np.asarray(getattr(res, f)) for f in ("point", "status", "halvings")},
    }


def forward_cost(model, x, repeats) -> float:
    """Seconds of one top-level jitted, vmapped forward pass of the batch ``x``."""
    import jax

    fn = jax.jit(jax.vmap(model.apply_fn, in_axes=(None, 0)))
    _, compiled = timed_compile(fn, model.params, x)
    seconds, _, _ = median_time(lambda: compiled(model.params, x), repeats)
    return seconds


def bench_model(name: str, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    import _models
    import jax
    from _torch_models import check_logits, torch_copy

    from bgeom import borderline as bl

    print(f"[{name}] training ({_models.MODELS[name]}) ...", flush=True)
    model = _models.train(name, data)
    pool = np.ascontiguousarray(np.concatenate([data.x_test, data.x_train]))
    logits = np.asarray(jax.jit(model.batched)(model.params, pool))
    labels = logits.argmax(-1)
    first, second = draw_pairs(pool, labels, args.pairs)
    a, b = pool[first], pool[second]
    torch_model = torch_copy(model.layers)
    copy_check = check_logits(torch_model, logits[:256], pool[:256])
    result: dict[str, Any] = {
        "model": name,
        "description": model.description,
        "test_accuracy": model.test_accuracy,
        "pairs": len(a),
        "torch_copy": copy_check,
    }
    print(
        f"[{name}] test accuracy {model.test_accuracy:.3f}; PyTorch copy: max |logit "
        f"difference| {copy_check['max_abs_difference']:.1e}",
        flush=True,
    )
    if not copy_check["ok"]:
        print(f"[{name}] the PyTorch copy's logits disagree; not timed", file=sys.stderr)
        return result | {"skipped": "PyTorch copy disagrees with the JAX model"}

    row = time_bgeom(model, a, b, args.max_halvings, args.repeats)
    res = row.pop("result")
    halvings = res["halvings"]
    fwd = forward_cost(model, a, args.repeats)
    useful = 2 * len(a) + int(halvings.sum())
    computed = len(a) * (2 + int(halvings.max()))
    row["floor"] = {
        "forward_batch_seconds": fwd,
        "forward_seconds_each": fwd / len(a),
        "useful_forwards": useful,
        "computed_forwards": computed,
        "work_efficiency": useful / computed,
        "floor_seconds": useful * fwd / len(a),
    }
    row["time_over_floor"] = row["median_seconds"] / row["floor"]["floor_seconds"]
    row["seconds_per_pair"] = row["median_seconds"] / len(a)
    row["statuses"] = {n: int(np.sum(res["status"] == i)) for i, n in enumerate(bl.STATUS_NAMES)}
    row["halvings_mean"] = float(halvings.mean())
    row["halvings_max"] = int(halvings.max())
    print(
        f"[{name}] bgeom: compile {row['compile_seconds']:.1f} s, median "
        f"{row['median_seconds']:.3f} s for {len(a)} pairs ({1e3 * row['seconds_per_pair']:.3f} "
        f"ms per pair), {row['time_over_floor']:.2f}x the floor; chunked map "
        f"{row['chunked_median_seconds']:.3f} s; statuses {row['statuses']}",
        flush=True,
    )

    k = min(args.loop_pairs, len(a))
    ref = run_reference(
        torch_model, a[:k], b[:k], labels[first[:k]], labels[second[:k]], TOL, args.max_halvings
    )
    subset = time_bgeom(model, a[:k], b[:k], args.max_halvings, args.repeats)
    sub = subset.pop("result")
    ref_per_pair = ref["seconds"] / k
    ours = np.array([bl.STATUS_NAMES[s] for s in sub["status"]])
    same_status = ours == np.array(ref["status"])
    same_halvings = sub["halvings"] == ref["attempts"]
    both = same_status & (ours == "converged")
    diff = np.abs(sub["point"][both] - ref["points"][both]).reshape(int(both.sum()), -1).max(1)
    agreement = {
        "pairs": k,
        "same_status_fraction": float(same_status.mean()),
        "same_halvings_fraction": float(same_halvings.mean()),
        "converged_both": int(both.sum()),
        "max_point_difference": float(diff.max()) if diff.size else None,
        "median_point_difference": float(np.median(diff)) if diff.size else None,
        "ok": bool(same_status.mean() >= AGREEMENT),
    }
    print(
        f"[{name}] reference: {k} pairs in {ref['seconds']:.2f} s ({1e3 * ref_per_pair:.2f} ms "
        f"per pair); bgeom on those pairs {subset['median_seconds']:.4f} s; same outcome on "
        f"{agreement['same_status_fraction']:.1%}",
        flush=True,
    )
    return result | {
        "bgeom": row,
        "bgeom_on_reference_pairs": {
            "median_seconds": subset["median_seconds"],
            "times_seconds": subset["times_seconds"],
            "seconds_per_pair": subset["median_seconds"] / k,
        },
        "reference": {
            "pairs": k,
            "seconds": ref["seconds"],
            "seconds_per_pair": ref_per_pair,
            "attempts_mean": float(ref["attempts"].mean()),
            "forward_passes": int(3 * ref["attempts"].sum()),
        },
        "speedup": ref_per_pair / row["seconds_per_pair"],
        "speedup_same_pairs": ref["seconds"] / subset["median_seconds"],
        "agreement": agreement,
    }


# --------------------------------------------------------------------------- output


def table(results: dict[str, Any]) -> list[str]:
    rows = [
        "| model | test acc. | row | pairs | compile / first call (s) | median (s) | per pair (ms) "
        "| speed-up of bgeom (x) | time / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        if "bgeom" not in r:
            rows.append(f"| {r['model']} | not timed: {r['skipped']} ||||||||")
            continue
        b, ref, s = r["bgeom"], r["reference"], r["bgeom_on_reference_pairs"]
        acc = f"{r['test_accuracy']:.3f}"
        rows += [
            f"| {r['model']} | {acc} | bgeom `jit(vmap(borderline_search))` | {r['pairs']} "
            f"| {fmt_seconds(b['compile_seconds'])} | {fmt_seconds(b['median_seconds'])} "
            f"| {1e3 * b['seconds_per_pair']:.4f} | 1 | {b['time_over_floor']:.2f} |",
            f"| {r['model']} | {acc} | bgeom `borderline_searches` (chunks of 256) "
            f"| {r['pairs']} | {fmt_seconds(b['chunked_first_call_seconds'])} "
            f"| {fmt_seconds(b['chunked_median_seconds'])} "
            f"| {1e3 * b['chunked_median_seconds'] / r['pairs']:.4f} | - | - |",
            f"| {r['model']} | {acc} | bgeom, the reference's pairs | {ref['pairs']} | - "
            f"| {fmt_seconds(s['median_seconds'])} | {1e3 * s['seconds_per_pair']:.4f} | - | - |",
            f"| {r['model']} | {acc} | reference style, PyTorch, one pair at a time "
            f"| {ref['pairs']} | - | {fmt_seconds(ref['seconds'])} "
            f"| {1e3 * ref['seconds_per_pair']:.3f} | {r['speedup']:.0f} (same pairs: "
            f"{r['speedup_same_pairs']:.0f}) | - |",
        ]
    return rows


def verdicts(results: dict[str, Any]) -> list[str]:
    lines = []
    for r in results["models"]:
        if "bgeom" not in r:
            continue
        b, a, f = r["bgeom"], r["agreement"], r["bgeom"]["floor"]
        met = "meets" if r["speedup"] >= TARGET_SPEEDUP else "misses"
        lines.append(
            f"- **{r['model']}** ({r['description']}): {r['pairs']} pairs in "
            f"{fmt_seconds(b['median_seconds'])} s, {r['speedup']:.0f}x the reference style's "
            f"throughput ({met} the {TARGET_SPEEDUP:.0f}x target), {b['time_over_floor']:.2f}x "
            f"its floor ({f['useful_forwards']} forward passes at "
            f"{1e6 * f['forward_seconds_each']:.1f} us each in one batch; work efficiency "
            f"{f['work_efficiency']:.0%}: every pair runs the {b['halvings_max']} halvings of "
            f"the slowest, {b['halvings_mean']:.1f} on average). Outcomes {b['statuses']}. On "
            f"the reference's {a['pairs']} pairs: the same outcome for "
            f"{a['same_status_fraction']:.1%}, the same number of halvings for "
            f"{a['same_halvings_fraction']:.1%}, points within {a['max_point_difference']} "
            f"(max abs.) where both converged; the chunked map equals the vmapped call: "
            f"{b['chunked_equals_vmap']}."
        )
    return lines


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    return generated_section(
        "borderline",
        "Borderline search: bgeom vs the reference style in PyTorch",
        results,
        [
            brief_machine_bullet(results)
            + f" PyTorch {results['torch_version']} on {results['torch_threads']} threads.",
            f"- **Task:** DeepDIG's bisection (docs/borderline.md) of {cfg['pairs']} segments "
            "between digits images (28x28) the model labels differently, drawn at random: stop "
            f"when |p_s - p_t| < {TOL:g}, fail on a midpoint of a third class, at most "
            f"{cfg['max_halvings']} halvings; models trained here (`benchmarks/_models.py`).",
            "- **bgeom:** one `jax.jit(jax.vmap(bgeom.borderline_search))` call over all "
            "pairs (compile apart), and `bgeom.borderline.borderline_searches` (the suite's "
            f"chunked map); medians of {cfg['repeats']} calls.",
            "- **Reference style (the peer):** CPU PyTorch on a copy of the weights whose "
            "logits match JAX's: one pair at a time, a Python loop over halvings, three "
            "single-image forward passes per halving (both ends and the midpoint) with NumPy "
            "probabilities, as DeepDIG's script does; capped like bgeom (the script has no "
            f"cap). Timed once on the first {cfg['loop_pairs']} pairs after one untimed pair. "
            "Speed-up = reference time per pair / bgeom's (in brackets: on the reference's "
            "pairs alone).",
            "- **Floor:** the forward passes the bisections need (two ends per pair plus one "
            "per halving) x the cost of one forward pass in a top-level jitted, vmapped batch "
            "of all pairs.",
            "",
            *table(results),
            "",
            *verdicts(results),
        ],
        setup=("pip install torch==2.13.0",),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000, help="segments bisected by bgeom")
    parser.add_argument(
        "--loop-pairs", type=int, default=200, help="segments bisected by the reference"
    )
    parser.add_argument("--max-halvings", type=int, default=60)
    add_repeats(parser, 5)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    add_output_options(parser, "borderline")
    args, _ = parser.parse_known_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is missing: pip install torch==2.13.0", file=sys.stderr)
        return 2
    import _models

    load0 = os.getloadavg()[0]
    data = _models.load_data()
    models = [bench_model(name, data, args) for name in args.models]
    results = run_record("bench_borderline.py", args, argv, load0) | {
        "models": models,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    publish(results, args, "borderline", summary=render, render=render)
    bad = [r["model"] for r in models if "agreement" not in r or not r["agreement"]["ok"]]
    if bad:
        print(f"outcomes disagree (or copy failed) for: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
