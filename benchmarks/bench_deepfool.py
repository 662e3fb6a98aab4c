"""DeepFool throughput: bgeom's ``jit(vmap(deepfool))`` against foolbox 3.3.4.

Both attacks run in one process on the SAME trained JAX model and the SAME
batch of digits images (the test images first, then training images):

- bgeom: ``jax.jit(jax.vmap(lambda x: bgeom.deepfool(apply_fn, params, x,
  bounds=(0, 1))))``; the label is the model's own prediction.
- foolbox: ``L2DeepFoolAttack(steps, candidates, overshoot).run(fmodel, x,
  Misclassification(own predictions))`` with ``fmodel = foolbox.JAXModel(
  jax.jit(batched_model), bounds=(0, 1))``.

Both clip the perturbed point to [0, 1] at every step and linearise at
``x0 + (1 + overshoot) r``, so they run the same algorithm. Timed repeats of
the two alternate (so a busy machine slows both alike); the first call, which
includes compilation, is reported apart. Margins are compared on the samples
where both attacks flipped the label.

An optional probe (``--no-probe`` skips it) times one DeepFool linearisation
(a forward pass and ``candidates - 1`` VJPs on the whole batch) at the top
level of a jitted function and inside a one-iteration ``lax.fori_loop``: XLA:CPU
compiles some convolution gradients much worse inside loop bodies, which is
where bgeom's ``lax.while_loop`` puts them.

Usage::

    python benchmarks/bench_deepfool.py [--batch 512 --repeats 5 --out benchmarks/results]

Writes ``OUT/deepfool.json`` and rewrites the DeepFool section of
``BENCHMARKS.md`` (``--markdown``; ``--no-markdown`` leaves it alone).
"""

from __future__ import annotations

import argparse
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
    test_accuracy,
    timed,
    timed_compile,
    versions_bullet,
)

TARGET_RATIO = 10.0
AGREEMENT_TOLERANCE = 0.01  # median relative margin difference


def load_batch(batch: int) -> tuple[Any, np.ndarray]:
    """The digits data and ``batch`` images: every test image first, then training images."""
    data = import_bgeom().data.load("digits")
    return data, first_images(data, batch)


def bench_model(name: str, data: Any, x_np: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``name`` on digits, then time and compare both attacks on ``x_np``."""
    import foolbox as fb
    import jax
    import jax.numpy as jnp

    bgeom = import_bgeom()
    print(f"[{name}] training on digits (config 'default', seed 0) ...", flush=True)
    train_s, trained = timed(lambda: bgeom.train.fit(name, data, seeds=0, progress=False))
    apply_fn, params = trained.apply_fn, trained.params
    x = jnp.asarray(x_np)
    n = len(x_np)

    # The one model both attacks use: batched logits, jitted.
    model = jax.jit(lambda xb: apply_fn.batched(params, xb))
    labels = block(jnp.argmax(model(x), axis=-1))

    # bgeom: compile ahead of time so the compile time is measured on its own.
    bgeom_fn = jax.jit(
        jax.vmap(
            lambda xi: bgeom.deepfool(
                apply_fn,
                params,
                xi,
                candidates=args.candidates,
                overshoot=args.overshoot,
                max_iter=args.steps,
                bounds=(0.0, 1.0),
            )
        )
    )
    bgeom_compile_s, bgeom_compiled = timed_compile(bgeom_fn, x)
    bgeom_first_run_s, bgeom_out = timed(lambda: bgeom_compiled(x))

    # foolbox: eager eagerpy loop around the jitted model; its first call traces
    # and compiles the model's JVPs, so it is reported apart as well.
    fmodel = fb.JAXModel(model, bounds=(0.0, 1.0))
    attack = fb.attacks.L2DeepFoolAttack(
        steps=args.steps, candidates=args.candidates, overshoot=args.overshoot
    )
    criterion = fb.criteria.Misclassification(labels)
    fb_first_s, fb_out = timed(lambda: attack.run(fmodel, x, criterion))

    bgeom_times, fb_times = [], []
    for i in range(args.repeats):
        fb_s, fb_out = timed(lambda: attack.run(fmodel, x, criterion))
        bgeom_s, bgeom_out = timed(lambda: bgeom_compiled(x))
        fb_times.append(fb_s)
        bgeom_times.append(bgeom_s)
        print(
            f"[{name}] repeat {i + 1}/{args.repeats}: foolbox {fb_s:.3f} s, bgeom {bgeom_s:.3f} s",
            flush=True,
        )

    # Correctness of both, checked with the model itself.
    labels_np = np.asarray(labels)
    fb_adv = np.asarray(fb_out)
    fb_flipped = np.asarray(jnp.argmax(model(jnp.asarray(fb_adv)), -1)) != labels_np
    fb_margin = np.linalg.norm((fb_adv - x_np).reshape(n, -1), axis=1)
    fb_in_bounds = bool(np.all((fb_adv >= 0.0) & (fb_adv <= 1.0)))

    b = jax.tree.map(np.asarray, bgeom_out)
    b_adv = np.asarray(x_np + b.perturbation)
    b_flipped = np.asarray(jnp.argmax(model(jnp.asarray(b_adv)), -1)) != labels_np
    b_converged = np.asarray(b.converged, bool)
    b_margin = np.asarray(b.margin, np.float64)

    both = b_converged & fb_flipped
    rel = np.abs(b_margin[both] - fb_margin[both]) / np.maximum(fb_margin[both], 1e-12)
    agreement = {
        "samples_both_flipped": int(both.sum()),
        "median_relative_difference": float(np.median(rel)) if rel.size else None,
        "p95_relative_difference": float(np.percentile(rel, 95)) if rel.size else None,
        "max_relative_difference": float(rel.max()) if rel.size else None,
        "tolerance": AGREEMENT_TOLERANCE,
    }
    agreement["ok"] = bool(
        rel.size and agreement["median_relative_difference"] < AGREEMENT_TOLERANCE
    )

    fb_median = statistics.median(fb_times)
    bgeom_median = statistics.median(bgeom_times)
    result = {
        "model": name,
        "test_accuracy": test_accuracy(trained),
        "train_seconds": train_s,
        "batch": n,
        "bgeom": {
            "compile_seconds": bgeom_compile_s,
            "first_run_seconds": bgeom_first_run_s,
            "first_call_seconds": bgeom_compile_s + bgeom_first_run_s,
            "times_seconds": bgeom_times,
            "median_seconds": bgeom_median,
            "throughput_per_second": n / bgeom_median,
            "flip_rate": float(b_converged.mean()),
            "flip_rate_rechecked": float(b_flipped.mean()),
            "converged_but_not_flipped": int((b_converged & ~b_flipped).sum()),
            "labels_match_model": bool(np.all(b.label == labels_np)),
            "iterations_mean": float(b.iterations.mean()),
            "iterations_max": int(b.iterations.max()),
            "median_margin": float(np.median(b_margin[b_converged])) if b_converged.any() else None,
        },
        "foolbox": {
            "first_call_seconds": fb_first_s,
            "times_seconds": fb_times,
            "median_seconds": fb_median,
            "throughput_per_second": n / fb_median,
            "flip_rate": float(fb_flipped.mean()),
            "in_bounds": fb_in_bounds,
            "median_margin": float(np.median(fb_margin[fb_flipped])) if fb_flipped.any() else None,
        },
        "speedup": fb_median / bgeom_median,
        "agreement": agreement,
    }
    if args.probe:
        result["probe"] = probe_loop_penalty(apply_fn, params, x, args.candidates)
    return result


def probe_loop_penalty(
    apply_fn: Callable, params: Any, x: Any, candidates: int, repeats: int = 3
) -> dict[str, Any]:
    """Time one DeepFool linearisation on the batch at top level and inside a loop.

    One linearisation is what bgeom's ``lax.while_loop`` body costs: a forward
    pass with its VJP, and the ``candidates - 1`` candidate gradients. They are
    computed as bgeom does (one VJP vmapped over the cotangents) and, for
    comparison, as separate VJPs. "loop" runs the same computation as the
    body of ``lax.fori_loop(0, n)`` with ``n = 1`` passed at run time.
    """
    import jax
    import jax.numpy as jnp

    def cotangents(xi):
        logits = apply_fn(params, xi)
        k = min(candidates, logits.shape[0])
        _, order = jax.lax.top_k(logits, k)
        onehots = jax.nn.one_hot(order, logits.shape[0], dtype=logits.dtype)
        return onehots[1:] - onehots[0]

    def gradients(xi, cot, mode):
        _, vjp = jax.vjp(lambda z: apply_fn(params, z), xi)
        if mode == "vmap":
            return jax.vmap(vjp)(cot)[0]
        return jnp.stack([vjp(c)[0] for c in cot])

    def top(xi, cot, mode):
        return gradients(xi, cot, mode).sum(0)

    def loop(xi, cot, n, mode):
        body = lambda i, r: r + 1e-3 * gradients(xi + r, cot, mode).sum(0)
        return jax.lax.fori_loop(0, n, body, jnp.zeros_like(xi))

    cot = jax.jit(jax.vmap(cotangents))(x)
    n = jnp.asarray(1, jnp.int32)
    out: dict[str, Any] = {"what": "one linearisation (forward + candidate VJPs) on the batch"}
    for mode in ("vmap", "unrolled"):
        fns = {
            "top_level": (jax.jit(jax.vmap(lambda a, c, m=mode: top(a, c, m))), (x, cot)),
            "in_loop": (
                jax.jit(jax.vmap(lambda a, c, k, m=mode: loop(a, c, k, m), (0, 0, None))),
                (x, cot, n),
            ),
        }
        for where, (fn, fn_args) in fns.items():
            block(fn(*fn_args))  # compile
            median, _, _ = median_time(lambda f=fn, a=fn_args: f(*a), repeats)
            out[f"{mode}_{where}_seconds"] = median
        print(
            f"  probe ({mode} VJPs): top level {out[f'{mode}_top_level_seconds']:.3f} s, "
            f"inside fori_loop {out[f'{mode}_in_loop_seconds']:.3f} s",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- output


def _fmt_rel(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def results_table(results: dict[str, Any]) -> str:
    """The main figures as a Markdown table (also printed to the terminal)."""
    rows = [
        "| model | test acc. | bgeom median (s) | bgeom samples/s | foolbox median (s) "
        "| foolbox samples/s | speed-up (x) | bgeom compile + first run (s) "
        "| foolbox first call (s) | flipped bgeom / foolbox | median rel. margin diff. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        b, f, a = r["bgeom"], r["foolbox"], r["agreement"]
        rows.append(
            f"| {r['model']} | {r['test_accuracy']:.3f} | {fmt_seconds(b['median_seconds'])} "
            f"| {b['throughput_per_second']:.0f} | {fmt_seconds(f['median_seconds'])} "
            f"| {f['throughput_per_second']:.0f} | {r['speedup']:.2f} "
            f"| {fmt_seconds(b['compile_seconds'])} + {fmt_seconds(b['first_run_seconds'])} "
            f"| {fmt_seconds(f['first_call_seconds'])} "
            f"| {b['flip_rate']:.1%} / {f['flip_rate']:.1%} "
            f"| {_fmt_rel(a['median_relative_difference'])} "
            f"(n={a['samples_both_flipped']}) |"
        )
    return "\n".join(rows)


def probe_table(results: dict[str, Any]) -> str | None:
    """The loop-penalty probe as a Markdown table, or None when it was skipped."""
    probed = [r for r in results["models"] if "probe" in r]
    if not probed:
        return None
    rows = [
        "| model | candidate VJPs | top level (s) | inside `fori_loop` (s) | loop / top level |",
        "|---|---|---|---|---|",
    ]
    for r in probed:
        p = r["probe"]
        for mode, label in (
            ("vmap", "one VJP vmapped over cotangents (bgeom)"),
            ("unrolled", "separate VJPs"),
        ):
            top, loop = p[f"{mode}_top_level_seconds"], p[f"{mode}_in_loop_seconds"]
            rows.append(
                f"| {r['model']} | {label} | {fmt_seconds(top)} | {fmt_seconds(loop)} "
                f"| {loop / top:.1f} |"
            )
    return "\n".join(rows)


def render_section(results: dict[str, Any]) -> str:
    """The generated DeepFool section of BENCHMARKS.md."""
    m, cfg = results["machine"], results["config"]
    v = m["versions"]
    lines = [
        f"- **Machine:** {machine_summary(m)}; JAX backend `{m['jax_backend']}`"
        + (f", `XLA_FLAGS={m['xla_flags']}`" if m["xla_flags"] else "")
        + ".",
        versions_bullet(m, ("flax", "foolbox", "eagerpy", "numpy")),
        f"- **Load average** (1 min) at start / end of the run: {load_average(results)}.",
        f"- **Data:** {cfg['batch']} digits images (all test images, then training images), "
        "8x8x1 in [0, 1]; models trained here with `bgeom.train.fit(name, digits, seeds=0)` "
        "(config `default`).",
        f"- **Attacks:** DeepFool L2, {cfg['steps']} steps, {cfg['candidates']} candidates, "
        f"overshoot {cfg['overshoot']}, both clipping to [0, 1] at every step and linearising "
        "at `x0 + (1 + overshoot) r`. bgeom: `jax.jit(jax.vmap(lambda x: bgeom.deepfool("
        "apply_fn, params, x, bounds=(0.0, 1.0))))`, compiled ahead of time. foolbox: "
        "`L2DeepFoolAttack(...).run(fmodel, x, Misclassification(labels))` with "
        "`fmodel = foolbox.JAXModel(jax.jit(batched_logits), bounds=(0, 1))` (the model "
        "is jitted so that foolbox's forward and backward passes run compiled; foolbox's own "
        "step loop is eager Python) and `labels` the model's own predictions, as bgeom uses.",
        f"- **Timing:** median of {cfg['repeats']} repeats per attack, foolbox and bgeom "
        "alternating; the first call (with compilation) is reported apart and not in the "
        "median. Throughput = batch / median time; speed-up = foolbox median / bgeom median.",
        "- **Agreement:** relative difference of the L2 margins `||x_adv - x||` over the "
        "samples both attacks flipped (flips re-checked with the model); the requirement is "
        f"a median below {AGREEMENT_TOLERANCE:.0%}.",
        f"- **Compatibility:** foolbox {v['foolbox']} and eagerpy {v['eagerpy']} run "
        "unpatched with this jax (DeepFool's code path uses none of the JAX APIs removed "
        "since, such as `jax.ops.index_update`); no shims are applied.",
        "",
        results_table(results),
        "",
    ]
    for r in results["models"]:
        a, b, f = r["agreement"], r["bgeom"], r["foolbox"]
        verdict = "meets" if r["speedup"] >= TARGET_RATIO else "is below"
        lines.append(
            f"- **{r['model']}:** bgeom is {r['speedup']:.2f}x foolbox's throughput, which "
            f"{verdict} the {TARGET_RATIO:.0f}x target. Margins agree "
            f"{'within' if a['ok'] else 'NOT within'} tolerance (median / 95th percentile / "
            f"max relative difference {_fmt_rel(a['median_relative_difference'])} / "
            f"{_fmt_rel(a['p95_relative_difference'])} / "
            f"{_fmt_rel(a['max_relative_difference'])}). bgeom needed "
            f"{b['iterations_mean']:.2f} steps on average, {b['iterations_max']} at most; "
            f"foolbox's adversarials stay in [0, 1]: {f['in_bounds']}."
        )
    probe = probe_table(results)
    if probe is not None:
        lines += [
            "",
            "### Probe: one linearisation at top level vs inside a loop",
            "",
            "Median time of one DeepFool linearisation (forward pass and candidate VJPs, "
            "whole batch) in a jitted function, at top level and as the body of a "
            "one-iteration `lax.fori_loop`; bgeom's iterations run inside a "
            "`lax.while_loop`, foolbox's are separate top-level calls. XLA:CPU is known to "
            "compile some convolutions much worse inside loop bodies "
            "([jax-ml/jax#12868](https://github.com/jax-ml/jax/issues/12868)); a loop / top "
            "level ratio well above 1 is that penalty, paid at every bgeom iteration.",
            "",
            probe,
        ]
    return generated_section(
        "deepfool",
        f"DeepFool: bgeom vs foolbox {v['foolbox']}",
        results,
        lines,
        setup=('pip install -e ".[bench]"',),
    )


def terminal_summary(results: dict[str, Any]) -> str:
    """What is printed at the end of a run: the results table, then the probe's."""
    probe = probe_table(results)
    return results_table(results) + (f"\n\n{probe}" if probe else "")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, from the repository root.

    Batch, repeats and models are always spelled out; the other options only
    when they differ from their defaults.
    """
    defaults = parse_args([])
    words = ["--batch", str(args.batch), "--repeats", str(args.repeats), "--models", *args.models]
    for option in ("steps", "candidates", "overshoot"):
        if getattr(args, option) != getattr(defaults, option):
            words += [f"--{option}", str(getattr(args, option))]
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
    p.add_argument("--batch", type=int, default=512, help="images per attack call")
    add_repeats(p, 5, "timed calls per attack")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--steps", type=int, default=50, help="DeepFool steps (max_iter)")
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--overshoot", type=float, default=0.02)
    add_output_options(p, "deepfool", "DeepFool")
    p.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="skip the top-level vs in-loop linearisation probe",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit status (1 if margins disagree or flips fail)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        import foolbox  # noqa: F401
    except ImportError:
        print('foolbox is missing: pip install -e ".[bench]"', file=sys.stderr)
        return 2
    load_start = os.getloadavg()[0]
    data, x_np = load_batch(args.batch)
    machine = machine_info()
    print(
        f"{machine_line(machine)}, foolbox {machine['versions']['foolbox']}; batch {len(x_np)}",
        flush=True,
    )
    models = [bench_model(name, data, x_np, args) for name in args.models]
    config = {
        "batch": len(x_np),
        "repeats": args.repeats,
        "steps": args.steps,
        "candidates": args.candidates,
        "overshoot": args.overshoot,
        "bounds": [0.0, 1.0],
        "target_speedup": TARGET_RATIO,
    }
    record = results_record("deepfool", _command(args), config, machine, load_start)
    results = record | {"models": models}
    publish(
        results, args, "deepfool", summary=terminal_summary, render=render_section, what="DeepFool"
    )
    failed = [
        r["model"]
        for r in models
        if not r["agreement"]["ok"] or not r["foolbox"]["flip_rate"] or not r["bgeom"]["flip_rate"]
    ]
    if failed:
        print(f"margins disagree or no flips for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
