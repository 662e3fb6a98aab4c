"""Connectivity paths: pooled ``find_paths`` against ``vmap(find_path)`` and a per-pair loop.

Usage::

    python benchmarks/bench_paths.py [--pairs 16] [--loop-pairs 4] [--repeats 3] [--models cnn mlp]

Each of ``--models`` (default: the ReLU CNN and MLP) is trained here on digits
(default recipe); ``--pairs`` pairs of
each of the three kinds of ``bgeom.paths.PAIR_KINDS`` are drawn with
``paths.make_pairs`` (seed 0). Paths between them (docs/connectivity.md: 100
samples per segment test, at most 31 anchors, depth 10, verification on 128
points) are searched three ways:

- ``bgeom.find_paths``: one pool of pending segments for all pairs (16 per step);
- ``jax.jit(jax.vmap(bgeom.find_path))``: every pair in lock step;
- a per-pair loop written the way a paper's script does it: a Python
  recursion over segments, the model called eagerly on the samples of each
  segment, each midpoint pushed into the class by an eager targeted-DeepFool
  loop (one ``jax.grad`` per step). It is timed on the first ``--loop-pairs``
  pairs of each kind; throughputs (pairs per second) are compared.

The targeted pushes are timed on their own too (``time_pushes``): the pushes
``make_pairs`` makes (every endpoint of another class moved into the pair's
class) through ``bgeom.batched(bgeom.targeted_deepfool)`` (how ``make_pairs``
runs them: top-level jitted steps, compaction), through
``jax.jit(jax.vmap(bgeom.targeted_deepfool))``, and one image at a time by the
loop's eager push. Inside ``find_paths`` the anchor pushes are not run by the
engine: each search step runs ``vmap`` of the targeted DeepFool search inside
the pool's ``lax.while_loop`` (under a ``lax.cond``), and the table says so.

bgeom's times are medians of ``--repeats`` runs after a first (compiling) call.
The ``connected`` flags of the three are compared pair by pair. Writes
``benchmarks/results/paths.json`` (``--out`` changes the folder) and rewrites its
section of BENCHMARKS.md (``--no-markdown``: not).
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

OPTIONS = dict(max_anchors=31, max_depth=10, samples=100, verify_samples=128, overshoot=0.02)
MAX_ITER = 50
# bgeom's form of the same settings: the pushes' options travel as one DeepFoolOptions.
SEARCH = {k: v for k, v in OPTIONS.items() if k != "overshoot"}


def _reference_push(f, z, label, overshoot, max_iter):
    """Eager targeted DeepFool: move ``z`` into class ``label`` (None if it fails)."""
    import jax
    import jax.numpy as jnp

    r = jnp.zeros_like(z)
    for _ in range(max_iter + 1):
        point = z + (1 + overshoot) * r
        logits = np.asarray(f(point))
        if int(np.argmax(logits)) == label:
            return point
        rival = int(np.argmax(np.where(np.arange(len(logits)) == label, -np.inf, logits)))
        w = jax.grad(lambda v, rival=rival: f(v)[label] - f(v)[rival])(point)
        g = float(logits[label] - logits[rival])
        norm = float(jnp.linalg.norm(w))
        if not np.isfinite(norm) or norm == 0:
            return None
        r = r + (abs(g) / norm + 1e-4) * w / norm
    return None


def reference_path(f, x1, x2, *, max_anchors, max_depth, samples, verify_samples, overshoot):
    """One pair, the way a per-sample script does it: host recursion, eager model calls.

    Returns ``(connected, num_anchors)``; ``connected`` uses the same dense
    re-sampling of every final segment as bgeom.
    """
    import jax
    import jax.numpy as jnp

    label = int(np.argmax(np.asarray(f(x1))))
    batched = jax.vmap(f)  # the model on a batch of points, eager
    ts = np.linspace(0.0, 1.0, samples)
    budget = {"anchors": max_anchors}

    def keeps(a, b, t):
        points = a[None] + jnp.asarray(t, a.dtype)[:, None, None, None] * (b - a)[None]
        return bool(np.all(np.argmax(np.asarray(batched(points)), axis=1) == label))

    def path(a, b, depth):
        if keeps(a, b, ts):
            return [a, b]
        if depth >= max_depth or budget["anchors"] == 0:
            return None
        m = _reference_push(f, (a + b) / 2, label, overshoot, MAX_ITER)
        if m is None:
            return None
        budget["anchors"] -= 1
        left = path(a, m, depth + 1)
        right = path(m, b, depth + 1) if left is not None else None
        return None if right is None else left[:-1] + right

    points = path(jnp.asarray(x1), jnp.asarray(x2), 0)
    if points is None:
        return False, max_anchors - budget["anchors"]
    verify = np.linspace(0.0, 1.0, verify_samples)
    ok = all(keeps(a, b, verify) for a, b in zip(points[:-1], points[1:], strict=True))
    return ok, len(points) - 2


def time_pushes(f, p, images, pairs, args: argparse.Namespace) -> dict[str, Any]:
    """The targeted pushes of ``make_pairs``, three ways; times, steps, agreement of success."""
    import jax
    import jax.numpy as jnp

    import bgeom

    labels = np.asarray(jax.jit(jax.vmap(lambda z: jnp.argmax(f(p, z))))(images))
    push1, push2 = labels[pairs.first] != pairs.label, labels[pairs.second] != pairs.label
    sources = np.r_[pairs.first[push1], pairs.second[push2]]
    targets = np.r_[pairs.label[push1], pairs.label[push2]].astype(np.int32)
    if not sources.size:
        return {"pushes": 0}
    x = jnp.asarray(images[sources])
    t = jnp.asarray(targets)
    kw = dict(overshoot=OPTIONS["overshoot"], max_iter=MAX_ITER)
    batched = lambda: bgeom.batched(bgeom.targeted_deepfool)(f, p, x, t, return_stats=True, **kw)
    lockstep = jax.jit(jax.vmap(lambda a, b: bgeom.targeted_deepfool(f, p, a, b, **kw)))
    out: dict[str, Any] = {"pushes": int(sources.size)}
    results = {}
    for method, fn in (("batched", batched), ("jit_vmap", lambda: lockstep(x, t))):
        first, _ = timed(fn)
        median, times, res = median_time(fn, args.repeats)
        out[method] = {"first_call_s": first, "median_s": median, "times": times}
        results[method] = res
    result, stats = results["batched"]
    out["batched"]["engine_stats"] = stats._asdict()
    it = np.asarray(results["jit_vmap"].iterations)
    out["jit_vmap"]["work_efficiency"] = float(it.sum() / (it.size * max(int(it.max()), 1)))
    single = lambda z: f(p, z)
    _reference_push(single, x[0], int(targets[0]), OPTIONS["overshoot"], MAX_ITER)  # warm
    start = time.perf_counter()
    loop = [
        _reference_push(single, x[i], int(targets[i]), OPTIONS["overshoot"], MAX_ITER)
        for i in range(len(sources))
    ]
    out["loop"] = {"seconds": time.perf_counter() - start}
    reached = {
        "batched": np.asarray(result.converged),
        "jit_vmap": np.asarray(results["jit_vmap"].converged),
        "loop": np.array([z is not None for z in loop]),
    }
    out["reached"] = {k: int(v.sum()) for k, v in reached.items()}
    out["reached_agree_jit_vmap"] = int(np.sum(reached["batched"] == reached["jit_vmap"]))
    out["reached_agree_loop"] = int(np.sum(reached["batched"] == reached["loop"]))
    print(
        f"pushes: {out['pushes']}, batched {out['batched']['median_s']:.3f} s, jit(vmap) "
        f"{out['jit_vmap']['median_s']:.3f} s, eager loop {out['loop']['seconds']:.2f} s",
        flush=True,
    )
    return out


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    import bgeom
    from bgeom import data, paths, train

    ds = data.load("digits")
    model = train.fit(name, ds, seeds=0, progress=False)
    f, p = model.apply_fn, model.params
    pairs = paths.make_pairs(jax.random.PRNGKey(0), f, p, ds.x_test, args.pairs)
    v = pairs.valid
    x1, x2, kind = jnp.asarray(pairs.x1[v]), jnp.asarray(pairs.x2[v]), pairs.kind[v]
    n = int(v.sum())

    push = bgeom.DeepFoolOptions(overshoot=OPTIONS["overshoot"], max_iter=MAX_ITER)
    pooled = lambda a, b: bgeom.find_paths(f, p, a, b, batch=16, push=push, **SEARCH)
    lockstep = jax.jit(jax.vmap(lambda a, b: bgeom.find_path(f, p, a, b, push=push, **SEARCH)))
    timings: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for method, fn in (("find_paths", pooled), ("vmap_find_path", lockstep)):
        first, res = timed(lambda fn=fn: fn(x1, x2))
        median, times, _ = median_time(lambda fn=fn: fn(x1, x2), args.repeats)
        timings[method] = {"first_call_s": first, "median_s": median, "times": times}
        results[method] = res
        print(f"{name} {method}: {n} pairs, median {median:.2f} s", flush=True)

    pushes = time_pushes(f, p, np.asarray(ds.x_test), pairs, args)

    # The loop on the first --loop-pairs pairs of each kind; bgeom on the same subset too.
    subset = np.concatenate(
        [np.flatnonzero(kind == k)[: args.loop_pairs] for k in range(len(paths.PAIR_KINDS))]
    )
    single = lambda z: f(p, z)
    reference_path(single, x1[subset[-1]], x2[subset[-1]], **OPTIONS)  # warm eager op caches
    start = time.perf_counter()
    loop = [reference_path(single, x1[i], x2[i], **OPTIONS) for i in subset]
    loop_s = time.perf_counter() - start
    print(f"loop: {len(subset)} pairs in {loop_s:.1f} s", flush=True)
    sub_a, sub_b = x1[subset], x2[subset]
    pooled(sub_a, sub_b)  # compile for this size
    sub_median, _, _ = median_time(lambda: pooled(sub_a, sub_b), args.repeats)

    conn = {k: np.asarray(r.converged) for k, r in results.items()}
    loop_conn = np.array([c for c, _ in loop])
    tested = np.asarray(results["find_paths"].segments_tested)
    per_s = {k: n / t["median_s"] for k, t in timings.items()}
    loop_per_s = len(subset) / loop_s
    return {
        "model": name,
        "test_accuracy": test_accuracy(model),
        "pairs": n,
        "pairs_per_kind": args.pairs,
        "timings": timings,
        "pairs_per_s": per_s,
        "loop_pairs": len(subset),
        "loop_s": loop_s,
        "loop_pairs_per_s": loop_per_s,
        "find_paths_subset_median_s": sub_median,
        "speedup_vs_vmap": timings["vmap_find_path"]["median_s"]
        / timings["find_paths"]["median_s"],
        "speedup_vs_loop": per_s["find_paths"] / loop_per_s,
        "speedup_vs_loop_same_pairs": loop_s / sub_median,
        "connected_fraction": float(conn["find_paths"].mean()),
        "connected_agree_vmap": int(np.sum(conn["find_paths"] == conn["vmap_find_path"])),
        "connected_agree_loop": int(np.sum(conn["find_paths"][subset] == loop_conn)),
        "anchors_find_paths_subset": np.asarray(results["find_paths"].num_anchors)[subset].tolist(),
        "anchors_loop": [a for _, a in loop],
        "pushes": pushes,
        "segments_tested_median": float(np.median(tested)),
        "segments_tested_max": int(tested.max()),
    }


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    rows = [
        "| model | method | pairs | first call (s) | median (s) | pairs/s "
        "| connected agrees with find_paths |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    push_rows = [
        "| model | pushes run by | pushes | first call (s) | median (s) | pushes/s "
        "| work efficiency | reached the class | reached agrees with batched |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        t, m = r["timings"], r["model"]
        rows += [
            f"| {m} | `find_paths` (pool of 16) | {r['pairs']} "
            f"| {t['find_paths']['first_call_s']:.1f} | {t['find_paths']['median_s']:.2f} "
            f"| {r['pairs_per_s']['find_paths']:.1f} | - |",
            f"| {m} | `jit(vmap(find_path))` | {r['pairs']} "
            f"| {t['vmap_find_path']['first_call_s']:.1f} | {t['vmap_find_path']['median_s']:.2f} "
            f"| {r['pairs_per_s']['vmap_find_path']:.1f} "
            f"| {r['connected_agree_vmap']} / {r['pairs']} |",
            f"| {m} | per-pair eager loop | {r['loop_pairs']} | - | {r['loop_s']:.1f} "
            f"| {r['loop_pairs_per_s']:.2f} | {r['connected_agree_loop']} / {r['loop_pairs']} |",
            f"| {m} | how `find_paths` pushes anchors: `vmap` of the targeted DeepFool search "
            "inside the pool's `lax.while_loop` (under `lax.cond`), not through `bgeom.engine`; "
            "`make_pairs` pushes endpoints with `bgeom.batched(targeted_deepfool)` (below) "
            "| - | - | - | - | - |",
        ]
        q = r["pushes"]
        if q.get("pushes"):
            st = q["batched"]["engine_stats"]
            n_push = q["pushes"]
            push_rows += [
                f"| {m} | `bgeom.batched(targeted_deepfool)` (as `make_pairs`) | {n_push} "
                f"| {q['batched']['first_call_s']:.1f} | {q['batched']['median_s']:.3f} "
                f"| {n_push / q['batched']['median_s']:.0f} | {st['work_efficiency']:.2f} "
                f"| {q['reached']['batched']} | - |",
                f"| {m} | `jit(vmap(targeted_deepfool))` | {n_push} "
                f"| {q['jit_vmap']['first_call_s']:.1f} | {q['jit_vmap']['median_s']:.3f} "
                f"| {n_push / q['jit_vmap']['median_s']:.0f} "
                f"| {q['jit_vmap']['work_efficiency']:.2f} | {q['reached']['jit_vmap']} "
                f"| {q['reached_agree_jit_vmap']} / {n_push} |",
                f"| {m} | eager per-image push (the loop's) | {n_push} | - "
                f"| {q['loop']['seconds']:.3f} | {n_push / q['loop']['seconds']:.0f} | - "
                f"| {q['reached']['loop']} | {q['reached_agree_loop']} / {n_push} |",
            ]
        lockstep_note = (
            "under vmap every pair runs as many segment tests as the hardest"
            if r["speedup_vs_vmap"] >= 1
            else "when every pair needs about as many tests, the pool's bookkeeping costs "
            "more than the lock step wastes"
        )
        verdicts += [
            f"- **{m}** (test accuracy {r['test_accuracy']:.3f}; {r['connected_fraction']:.0%} "
            f"connected; segment tests per pair: median {r['segments_tested_median']:.0f}, max "
            f"{r['segments_tested_max']}): `find_paths` is **{r['speedup_vs_vmap']:.1f}x** "
            f"`vmap(find_path)` on the same pairs ({lockstep_note}) and "
            f"**{r['speedup_vs_loop']:.0f}x** the loop's throughput "
            f"({r['speedup_vs_loop_same_pairs']:.0f}x on the loop's {r['loop_pairs']} pairs "
            f"alone, {r['find_paths_subset_median_s']:.2f} s). Anchors on the loop's pairs, "
            f"find_paths / loop: {r['anchors_find_paths_subset']} / {r['anchors_loop']}.",
        ]
    return generated_section(
        "paths",
        "Connectivity paths: `find_paths` vs `vmap(find_path)` vs a per-pair loop",
        results,
        [
            brief_machine_bullet(results),
            f"- **Task:** paths between {cfg['pairs']} pairs of each kind (natural, "
            "natural-adversarial, adversarial; `paths.make_pairs`, seed 0) for ReLU models "
            "trained here on digits; 100 samples per segment test, at most 31 anchors, depth "
            "10, targeted DeepFool (overshoot 0.02, 50 steps), every final segment re-sampled "
            "at 128 points.",
            f"- **Timing:** bgeom medians of {cfg['repeats']} runs after the first (compiling) "
            f"call. The loop (host recursion, eager model calls, eager targeted DeepFool, "
            f"depth-first) runs the first {cfg['loop_pairs']} pairs of each kind once, after "
            "one untimed pair that warms JAX's eager caches. Breadth-first vs depth-first "
            "order and batched vs single model calls can place anchors differently.",
            "- **Targeted pushes** (targeted DeepFool, overshoot 0.02, 50 steps): the pushes "
            "`make_pairs` makes for these pairs (each endpoint of another class moved into the "
            "pair's class), timed alone: through `bgeom.batched` (top-level jitted steps, "
            "finished images leave; work efficiency = `EngineStats.steps / computed_steps`), "
            "`jit(vmap)` (lock step: the images' steps / (pushes x the most steps)) and the "
            "loop's eager push, one image at a time (once, after one untimed push). The "
            "batched pushes' first call finds their steps compiled already (by `make_pairs`, "
            "same shapes).",
            "",
            *rows,
            "",
            *push_rows,
            "",
            *verdicts,
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16, help="pairs per kind")
    parser.add_argument("--loop-pairs", type=int, default=4, help="loop pairs per kind")
    add_repeats(parser, 3)
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], help="cnn, mlp, lenet")
    add_output_options(parser, "paths")
    args, _ = parser.parse_known_args(argv)
    load0 = os.getloadavg()[0]
    models = [run(name, args) for name in args.models]
    results = run_record("bench_paths.py", args, argv, load0) | {"models": models}
    publish(results, args, "paths", summary=render, render=render)
    # A correctness check make bench notices: the two bgeom searches must agree.
    return 0 if all(r["connected_agree_vmap"] == r["pairs"] for r in models) else 1


if __name__ == "__main__":
    sys.exit(main())
