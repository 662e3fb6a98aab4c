"""Distances to a convex hull: bgeom's ``hull_distance`` against scipy NNLS per query.

Usage::

    python benchmarks/bench_features.py [--points 20000 50000] [--queries 1000]
        [--nnls-queries 40] [--repeats 3]

For each ``--points`` n: n points in 64-d (standard normal, float32, seed 0) and
``--queries`` queries, half outside the hull (fresh standard-normal samples) and
half inside (convex combinations of 65 random points, Dirichlet(1/2) weights).
The distance from every query to the hull of all n points by:

- bgeom: ``bgeom.features.hull_distance(points, queries)`` (one call for the whole batch;
  Wolfe's minimum-norm-point algorithm with column generation, batched over
  queries; docs/features.md); median of ``--repeats`` calls after the first
  (compiling) one;
- scipy: ``scipy.optimize.nnls`` per query on ``[points^T; w 1^T] a = [q; w]``
  (float64, w = 1e3 x the largest |coordinate|: the sum-to-one row weighted
  heavily), the way the distance is computed without a dedicated solver. NNLS
  is timed on the first ``--nnls-queries`` queries of each kind and its total
  for all queries extrapolated from the per-kind medians (it would take minutes);
- cvxpy (``--cvxpy-solver``, default CLARABEL, an interior-point solver; OSQP
  at its default tolerance took 9 s per query at n = 2,000, 17x CLARABEL, and is
  no more accurate) on the first ``--cvxpy`` queries of the subset, when cvxpy
  is installed (``pip install cvxpy``; not a bgeom dependency).

The distances are compared query by query on the subset: relative difference
outside the hull, absolute difference (relative to the point set's radius)
inside. The floor of a bgeom call is its full passes over the points (the
matrix-vector products the solver cannot avoid: one per round per query) times
the cost of one, measured as a batched ``queries @ points.T`` and its minimum;
``call / floor`` is the overhead of Wolfe's steps on the working sets and of the
batch waiting for its slowest query. Writes ``benchmarks/results/features.json``
(``--out`` changes the folder) and rewrites its section of BENCHMARKS.md
(``--no-markdown``: not). Exits non-zero when the distances disagree.
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    command_line,
    fmt_seconds,
    generated_section,
    import_bgeom,
    machine_info,
    machine_line,
    median_time,
    publish,
    results_record,
    timed,
    versions_bullet,
)

DIM = 64
TARGET = 50.0
RTOL = 1e-3  # agreement required outside the hull (relative)
ATOL = 1e-3  # ... and inside (relative to the radius of the point set)


def make_problem(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points, queries and whether each query was built inside the hull."""
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((n, DIM)).astype(np.float32)
    outside = queries // 2
    far = rng.standard_normal((outside, DIM))
    weights = rng.dirichlet(np.full(DIM + 1, 0.5), queries - outside)
    picks = rng.integers(0, n, (queries - outside, DIM + 1))
    near = np.einsum("qk,qkd->qd", weights, points[picks].astype(np.float64))
    inside = np.arange(queries) >= outside
    return points, np.concatenate([far, near]).astype(np.float32), inside


def nnls_distance(a: np.ndarray, q: np.ndarray, w: float) -> float:
    from scipy.optimize import nnls

    n = a.shape[1]
    x, _ = nnls(a, np.append(q.astype(np.float64), w), maxiter=50 * n)
    x = x / x.sum()
    return float(np.linalg.norm(a[:-1] @ x - q))


def cvxpy_distance(points: np.ndarray, q: np.ndarray, solver: str) -> float | None:
    try:
        import cvxpy as cp
    except ImportError:
        return None
    a = cp.Variable(len(points), nonneg=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(points.T @ a - q)), [cp.sum(a) == 1])
    prob.solve(solver=solver)
    weights = np.maximum(np.asarray(a.value, np.float64), 0)
    return float(np.linalg.norm(points.T @ (weights / weights.sum()) - q))


def one_pass_seconds(points: np.ndarray, queries: np.ndarray, repeats: int) -> float:
    """Seconds of one full pass per query: a batched ``queries @ points.T`` and its minimum."""
    import jax
    import jax.numpy as jnp

    fn = jax.jit(lambda p, x: jnp.min(x @ p.T, axis=1))
    p, x = jnp.asarray(points), jnp.asarray(queries)
    timed(lambda: fn(p, x))
    seconds, _, _ = median_time(lambda: fn(p, x), max(repeats, 3))
    return seconds / len(queries)


def bench_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    import_bgeom()
    from bgeom.features import hull_distance

    points, queries, inside = make_problem(n, args.queries)
    print(f"[n={n}] bgeom hull_distance on {len(queries)} queries ...", flush=True)

    def call():
        return hull_distance(points, queries, batch_size=args.batch_size)

    first, res = timed(call)
    seconds, times, res = median_time(call, args.repeats)
    distance = np.asarray(res.distance, np.float64)
    passes = np.asarray(res.passes)
    steps = np.asarray(res.iterations)
    floor = float(passes.sum()) * one_pass_seconds(points, queries[: args.batch_size], args.repeats)

    # scipy NNLS on a subset of each kind, extrapolated to all queries.
    w = 1e3 * float(np.abs(points).max())
    a = np.vstack([points.T.astype(np.float64), np.full((1, n), w)])
    subset = np.concatenate(
        [np.flatnonzero(~inside)[: args.nnls_queries], np.flatnonzero(inside)[: args.nnls_queries]]
    )
    print(f"[n={n}] scipy nnls on {len(subset)} queries ...", flush=True)
    nnls_times, nnls_dist = {}, {}
    for i in subset:
        start = time.perf_counter()
        nnls_dist[int(i)] = nnls_distance(a, queries[i], w)
        nnls_times[int(i)] = time.perf_counter() - start
    per_kind = {
        kind: statistics.median(
            nnls_times[int(i)] for i in subset if inside[i] == (kind == "inside")
        )
        for kind in ("outside", "inside")
    }
    nnls_total = per_kind["outside"] * int((~inside).sum()) + per_kind["inside"] * int(inside.sum())
    radius = float(np.max(np.linalg.norm(points - points.mean(0), axis=1)))
    rel = [
        abs(distance[i] - nnls_dist[int(i)]) / nnls_dist[int(i)] for i in subset if not inside[i]
    ]
    absolute = [abs(distance[i] - nnls_dist[int(i)]) / radius for i in subset if inside[i]]
    cvx = None
    if args.cvxpy:
        cvx_sub = subset[: args.cvxpy]
        start = time.perf_counter()
        cvx_dist = [
            cvxpy_distance(points.astype(np.float64), queries[i], args.cvxpy_solver)
            for i in cvx_sub
        ]
        if all(c is not None for c in cvx_dist):
            cvx = {
                "queries": len(cvx_sub),
                "per_query_seconds": (time.perf_counter() - start) / len(cvx_sub),
                "solver": args.cvxpy_solver,
                "max_abs_diff_vs_nnls": float(
                    max(abs(c - nnls_dist[int(i)]) for c, i in zip(cvx_dist, cvx_sub, strict=True))
                ),
            }
    result = {
        "points": n,
        "dim": DIM,
        "queries": len(queries),
        "bgeom": {
            "first_call_seconds": first,
            "median_seconds": seconds,
            "times_seconds": times,
            "converged_fraction": float(np.mean(np.asarray(res.converged))),
            "mean_passes": float(passes.mean()),
            "mean_steps": float(steps.mean()),
            "max_steps": int(steps.max()),
            "median_distance_outside": float(np.median(distance[~inside])),
        },
        "floor_seconds": floor,
        "call_over_floor": seconds / floor,
        "nnls": {
            "queries_timed": len(subset),
            "median_seconds_per_query": per_kind,
            "estimated_total_seconds": nnls_total,
        },
        "cvxpy": cvx,
        "speedup_vs_nnls": nnls_total / seconds,
        "speedup_vs_cvxpy": cvx["per_query_seconds"] * len(queries) / seconds if cvx else None,
        "max_rel_diff_outside": float(max(rel)) if rel else None,
        "max_abs_diff_inside_over_radius": float(max(absolute)) if absolute else None,
        "agree": bool((not rel or max(rel) <= RTOL) and (not absolute or max(absolute) <= ATOL)),
    }
    print(
        f"[n={n}] bgeom {seconds:.2f} s (floor {floor:.2f} s), nnls ~{nnls_total:.1f} s: "
        f"{result['speedup_vs_nnls']:.1f}x; max rel. diff {result['max_rel_diff_outside']}",
        flush=True,
    )
    return result


def results_table(results: dict[str, Any]) -> str:
    rows = [
        "| points | queries | bgeom (s) | first call (s) | passes / query | Wolfe steps / query "
        "(max) | floor (s) | call / floor | NNLS per query out / in (ms) | NNLS all queries "
        "(s, est.) | speed-up | max rel. diff outside | max diff inside / radius | converged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["sizes"]:
        b, k = r["bgeom"], r["nnls"]["median_seconds_per_query"]
        rows.append(
            f"| {r['points']} | {r['queries']} | {fmt_seconds(b['median_seconds'])} | "
            f"{fmt_seconds(b['first_call_seconds'])} | {b['mean_passes']:.1f} | "
            f"{b['mean_steps']:.0f} ({b['max_steps']}) | {fmt_seconds(r['floor_seconds'])} | "
            f"{r['call_over_floor']:.1f} | {k['outside'] * 1e3:.0f} / {k['inside'] * 1e3:.0f} | "
            f"{r['nnls']['estimated_total_seconds']:.1f} | {r['speedup_vs_nnls']:.1f} | "
            f"{r['max_rel_diff_outside']:.1e} | {r['max_abs_diff_inside_over_radius']:.1e} | "
            f"{b['converged_fraction']:.3f} |"
        )
    return "\n".join(rows)


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    cfg = results["config"]
    lines = [
        brief_machine_bullet(results),
        versions_bullet(m, ("scipy", "numpy")),
        f"- **Problem:** n points in {DIM}-d (standard normal, float32) and {cfg['queries']} "
        "queries, half outside the hull (fresh standard-normal samples), half inside (convex "
        f"combinations of {DIM + 1} random points); the distance from each query to the hull "
        "of all n points.",
        "- **bgeom:** one `bgeom.hull_distance(points, queries)` call (Wolfe's "
        "minimum-norm-point algorithm with column generation, batched over queries, "
        f"`batch_size={cfg['batch_size']}`); median of {cfg['repeats']} calls after the first "
        "(compiling) one. **Floor:** the full passes over the points it made (one per round "
        "per query) times one pass per query (a batched `queries @ points.T` and its min).",
        "- **scipy:** `scipy.optimize.nnls` per query on `[points^T; w 1^T] a = [q; w]` "
        f"(float64, w = 1e3 max |p|), timed on {cfg['nnls_queries']} queries of each kind; "
        "its total for all queries is extrapolated from the per-kind medians.",
        "- **cvxpy:** "
        + (
            "; ".join(
                f"n={r['points']}: {r['cvxpy']['solver']}, "
                f"{r['cvxpy']['per_query_seconds'] * 1e3:.0f} ms per query "
                f"({r['speedup_vs_cvxpy']:.0f}x slower per query than bgeom), max |difference| "
                f"from NNLS {r['cvxpy']['max_abs_diff_vs_nnls']:.1e}"
                for r in results["sizes"]
                if r["cvxpy"]
            )
            or "not installed (not a bgeom dependency), not run."
        ),
        "",
        results_table(results),
        "",
    ]
    for r in results["sizes"]:
        verdict = "meets" if r["speedup_vs_nnls"] >= TARGET else "MISSES"
        lines.append(
            f"- **n = {r['points']}:** {r['speedup_vs_nnls']:.1f}x NNLS ({verdict} the "
            f"{TARGET:.0f}x target); call / floor {r['call_over_floor']:.1f}; distances "
            f"{'agree' if r['agree'] else 'DISAGREE'} (outside within {RTOL:g} relative, "
            f"inside within {ATOL:g} of the radius)."
        )
    return generated_section(
        "features", "Distances to a convex hull: bgeom vs scipy NNLS", results, lines
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, nargs="+", default=[20000, 50000])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nnls-queries", type=int, default=40, help="NNLS queries timed per kind")
    p.add_argument("--cvxpy", type=int, default=4, help="queries solved by cvxpy if installed")
    p.add_argument(
        "--cvxpy-solver", default="CLARABEL", help="cvxpy's solver (OSQP: minutes per query)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    add_repeats(p, 3)
    add_output_options(p, "features")
    args = p.parse_args(argv)
    if args.queries < 2 or min(args.points) < 2 or args.nnls_queries < 1:
        p.error("--queries and --points must be >= 2, --nnls-queries >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    machine = machine_info()
    print(machine_line(machine))
    sizes = [bench_size(n, args) for n in args.points]
    words = ["--points", *map(str, args.points), "--queries", str(args.queries)]
    words += ["--nnls-queries", str(args.nnls_queries), "--repeats", str(args.repeats)]
    words += ["--cvxpy", str(args.cvxpy), "--cvxpy-solver", args.cvxpy_solver]
    if args.no_markdown:
        words.append("--no-markdown")
    config = {
        "queries": args.queries,
        "nnls_queries": args.nnls_queries,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
    }
    record = results_record(
        "features", command_line("bench_features.py", words), config, machine, load_start
    )
    results = record | {"sizes": sizes}
    publish(results, args, "features", summary=results_table, render=render)
    return 0 if all(r["agree"] for r in sizes) else 1


if __name__ == "__main__":
    sys.exit(main())
