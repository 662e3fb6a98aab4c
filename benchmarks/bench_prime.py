"""PRIME augmentation throughput: bgeom against the reference's primitives in CPU PyTorch.

Usage::

    python benchmarks/bench_prime.py [--batch 256] [--size 32] [--repeats 5] [--threads 0]

Augments one batch of ``--batch`` colour images of ``--size`` x ``--size`` x 3
(the digits resized and tinted, in [0, 1]) with PRIME's default recipe
(3 chains of depth U{1..3}, spectral / spatial / colour primitives with the
reference's CIFAR parameters):

- bgeom: ``jax.jit(augment.PRIME().augment)``, one ``prime`` draw per image
  mapped over the batch with ``lax.map`` (only the primitive each step chose
  runs); also ``jax.jit(jax.vmap(augment.prime))`` (every primitive computed for
  every image and step, then selected), for comparison;
- the peer: a faithful port of the reference's modules (``RandomFilter``,
  ``Diffeo``, ``RandomSmoothColor``, ``GeneralizedPRIMEModule.aug`` of
  amodas/PRIME-augmentations) in CPU PyTorch, run the reference's way: on the
  whole batch at once, every primitive applied to every image of the 3 x batch
  chain copies at every depth step and masked, one diffeomorphism field and one
  set of primitive parameters per call (the reference draws them per batch),
  under ``torch.no_grad()``.

Both are timed as the median of ``--repeats`` calls after a first call (bgeom's
compilation, PyTorch's warm-up) reported apart; throughput = batch / median.
Also the time bgeom takes to corrupt the batch with every common corruption at
every severity (``bgeom.corruptions.apply_all``, jitted and vmapped, compile
apart) and to evaluate a CNN of that input shape on the result (the work of the
``robustness`` probe per batch). A sanity check compares the mean change
``|x' - x|`` of the two augmentations (they draw different random numbers, so
only their statistics can agree) and fails on NaN or values outside [0, 1].
Writes ``benchmarks/results/prime.json`` (``--out``) and rewrites the
BENCHMARKS.md section (``--markdown``; ``--no-markdown``: not).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
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
    timed_compile,
    versions_bullet,
)

TARGET_RATIO = 10.0

# --------------------------------------------------------------------------- the peer
#
# A port of amodas/PRIME-augmentations (utils/rand_filter.py, utils/diffeomorphism.py,
# utils/color_jitter.py, utils/prime.py) with its CIFAR-10 configuration, in plain
# torch (einsum for opt_einsum's contract, reshape for einops' rearrange).


def reference_modules() -> list[Any]:
    """The reference's three primitives, in its order (diffeo, colour, filter), stochastic."""
    import torch

    class RandomFilter(torch.nn.Module):
        def __init__(self, kernel_size=3, sigma=4.0):
            super().__init__()
            self.kernel_size, self.sigma_max = kernel_size, sigma

        def forward(self, img):
            sigma = torch.empty(1).uniform_(0.0, self.sigma_max).item()  # per call
            b, k = img.shape[0], self.kernel_size
            x = img.transpose(0, 1)  # c b h w: one group (kernel) per image
            delta = torch.zeros((1, k, k))
            centre = int(math.ceil(k / 2))  # the reference's off-centre delta
            delta[0, centre, centre] = 1.0
            weight = (sigma * torch.randn((b, k, k)) + delta).reshape(b, 1, k, k)
            out = torch.nn.functional.conv2d(x, weight, padding="same", groups=b)
            out[out.isnan()] = 1.0
            return torch.clamp(out.transpose(0, 1), 0.0, 1.0)

    class Diffeo(torch.nn.Module):
        def __init__(
            self, s_t=1.0, r_t=1.0, s_cut=1.0, r_cut=1.0, cut_min=2, cut_max=100, alpha=1.0
        ):
            super().__init__()
            self.cut_min, self.cut_max, self.alpha = cut_min, cut_max, alpha
            beta = torch.distributions.beta.Beta
            self.beta_t = beta(s_t - s_t / (r_t + 1), s_t / (r_t + 1))
            self.beta_cut = beta(s_cut - s_cut / (r_cut + 1), s_cut / (r_cut + 1))
            self.modes = {}

        def field(self, n, m):
            if (n, m) not in self.modes:  # the reference caches these (lru_cache)
                x = torch.linspace(0, 1, n)
                k = torch.arange(1, m + 1, dtype=torch.float32)
                i, j = torch.meshgrid(k, k, indexing="ij")
                r = (i.pow(2) + j.pow(2)).sqrt()
                self.modes[n, m] = ((r < m + 0.5) / r, torch.sin(math.pi * x[:, None] * k[None, :]))
            e, s = self.modes[n, m]
            return torch.einsum("ij,xi,yj->yx", torch.randn(m, m) * e, s, s)

        def forward(self, img):
            top = torch.randint(self.cut_min + 1, self.cut_max + 1, (1,)).item()
            n = img.shape[-1]
            cut = int(self.beta_cut.sample() * (top + 1 - self.cut_min) + self.cut_min)
            log = math.log(cut + 1e-6)
            t1 = 1 / (math.pi * n**2 * log)
            t2 = max(t1, self.alpha * 4 / (math.pi**3 * (cut + 1e-6) ** 2 * log))
            t = float(self.beta_t.sample() * (t2 - t1) + t1)
            dx, dy = t**0.5 * self.field(n, cut) * n, t**0.5 * self.field(n, cut) * n
            y, x = torch.meshgrid(torch.arange(float(n)), torch.arange(float(n)), indexing="ij")
            xn, yn = (x - dx).clamp(0, n - 1), (y - dy).clamp(0, n - 1)
            xf, yf, xc, yc = (
                xn.floor().long(),
                yn.floor().long(),
                xn.ceil().long(),
                yn.ceil().long(),
            )
            xv, yv = xn - xf, yn - yf
            a = img
            return (
                (1 - yv) * (1 - xv) * a[..., yf, xf]
                + (1 - yv) * xv * a[..., yf, xc]
                + yv * (1 - xv) * a[..., yc, xf]
                + yv * xv * a[..., yc, xc]
            )

    class RandomSmoothColor(torch.nn.Module):
        def __init__(self, cut=100, t=0.01):
            super().__init__()
            self.cut_max, self.t_max = cut, t

        def forward(self, img):
            cut = torch.randint(1, self.cut_max + 1, (1,)).item()
            t = torch.empty(1).uniform_(0.0, self.t_max).item()
            b, c, h, w = img.shape
            colors = img.reshape(b, c, h * w)
            coeff = torch.randn((b, c, cut)) * math.sqrt(t)
            k = torch.arange(1, cut + 1)
            freqs = torch.sin(colors[..., None] * k[None, None, None, :] * math.pi)
            out = torch.einsum("bcf,bcnf->bcn", coeff, freqs) + colors
            return torch.clamp(out, 0, 1).reshape(b, c, h, w)

    return [Diffeo(), RandomSmoothColor(), RandomFilter()]


def reference_prime(img: Any, modules: list[Any], width: int = 3, max_depth: int = 3) -> Any:
    """``GeneralizedPRIMEModule.aug``: every primitive on every chain copy at every depth
    step, masked by the step's choice and the chain's depth; Dirichlet / Beta mixing."""
    import torch

    b = img.shape[0]
    ws = torch.distributions.Dirichlet(torch.ones(width)).sample([b])
    m = torch.distributions.Beta(torch.ones(1), torch.ones(1)).sample([b])[..., None, None]
    rep = img.unsqueeze(0).expand(width, *img.shape).reshape(width * b, *img.shape[1:])
    depth_combos = torch.tril(torch.ones((max_depth, max_depth)))
    depth_mask = depth_combos[torch.randint(0, max_depth, (rep.shape[0],))][..., None, None, None]
    aug = rep.clone()
    for d in range(max_depth):
        choice = torch.eye(len(modules))[torch.randint(0, len(modules), (rep.shape[0],))]
        mixed = torch.zeros_like(aug)
        for i, module in enumerate(modules):
            mixed += module(aug) * choice[:, i, None, None, None]
        aug = depth_mask[:, d] * mixed + (1.0 - depth_mask[:, d]) * aug
    mix = torch.einsum("bm,mbchw->bchw", ws, aug.reshape(width, *img.shape))
    return (1.0 - m) * img + m * mix


# --------------------------------------------------------------------------- the run


def make_images(batch: int, size: int) -> np.ndarray:
    """``batch`` digits resized to ``size`` x ``size``, each tinted by a random colour."""
    bgeom = import_bgeom()
    digits = bgeom.data.load("digits")
    pool = np.concatenate([digits.x_test, digits.x_train])
    reps = -(-batch // len(pool))
    grey = bgeom.data.resize(np.concatenate([pool] * reps)[:batch], size)
    tint = np.random.default_rng(0).uniform(0.3, 1.0, size=(batch, 1, 1, 3)).astype(np.float32)
    return np.ascontiguousarray(np.clip(grey * tint + 0.1 * (1 - tint), 0.0, 1.0))


def check(x: np.ndarray, out: np.ndarray, who: str) -> dict[str, Any]:
    """Range and mean change of an augmented batch; exits on NaN or values outside [0, 1]."""
    finite = bool(np.all(np.isfinite(out)))
    lo, hi = float(np.min(out)), float(np.max(out))
    if not finite or lo < 0.0 or hi > 1.0 or out.shape != x.shape:
        raise SystemExit(
            f"{who}: output has shape {out.shape}, range [{lo}, {hi}], finite {finite}"
        )
    return {"min": lo, "max": hi, "mean_abs_change": float(np.mean(np.abs(out - x)))}


def bench_bgeom(x: np.ndarray, repeats: int) -> dict[str, Any]:
    import jax

    import_bgeom()
    from bgeom import augment

    key = jax.random.PRNGKey(0)
    xs = jax.device_put(x)
    out = {}
    runs = {
        "map": jax.jit(augment.PRIME().augment),
        "vmap": jax.jit(lambda k, b: jax.vmap(augment.prime)(jax.random.split(k, len(b)), b)),
    }
    for name, fn in runs.items():
        compile_s, compiled = timed_compile(fn, key, xs)
        first_s, first = timed(lambda c=compiled: c(key, xs))
        keys = iter(jax.random.split(jax.random.PRNGKey(1), repeats))
        median, times, _ = median_time(lambda c=compiled, ks=keys: c(next(ks), xs), repeats)
        out[name] = {
            "compile_s": compile_s,
            "first_s": first_s,
            "median_s": median,
            "times_s": times,
            "images_per_s": len(x) / median,
            **check(x, np.asarray(first), f"bgeom {name}"),
        }
    return out


def bench_reference(x: np.ndarray, repeats: int, threads: int) -> dict[str, Any]:
    import torch
    from _torch_models import to_nchw

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    modules = reference_modules()
    images = to_nchw(x)
    with torch.no_grad():
        first_s, first = timed(lambda: reference_prime(images, modules))
        median, times, _ = median_time(lambda: reference_prime(images, modules), repeats)
    return {
        "first_s": first_s,
        "median_s": median,
        "times_s": times,
        "images_per_s": len(x) / median,
        "torch_threads": torch.get_num_threads(),
        **check(x, first.permute(0, 2, 3, 1).numpy(), "reference"),
    }


def bench_corruptions(x: np.ndarray, repeats: int) -> dict[str, Any]:
    """Every corruption at every severity of the batch, and a CNN's labels on them."""
    import jax
    import jax.numpy as jnp

    import_bgeom()
    from bgeom import corruptions, models

    names = corruptions.names_for(x.shape[-1])
    keys = jax.random.split(jax.random.PRNGKey(0), len(x))
    severities = jnp.arange(1, 6)
    per_image = jax.vmap(lambda k, xi, s: corruptions.apply_all(k, xi, s, names), (0, 0, None))
    corrupt = jax.jit(jax.vmap(per_image, in_axes=(None, None, 0)))  # (5, n, names, ...)
    apply_fn, params = models.functional(models.create("cnn", x.shape[1:], 10))
    predict = jax.jit(lambda p, imgs: jnp.argmax(jax.vmap(lambda i: apply_fn(p, i))(imgs), -1))
    xs = jax.device_put(x)
    compile_s, compiled = timed_compile(corrupt, keys, xs, severities)
    timed(lambda: compiled(keys, xs, severities))
    median, times, images = median_time(lambda: compiled(keys, xs, severities), repeats)
    flat = images.reshape(-1, *x.shape[1:])
    eval_compile_s, predictor = timed_compile(predict, params, flat)
    timed(lambda: predictor(params, flat))
    eval_median, _, _ = median_time(lambda: predictor(params, flat), repeats)
    return {
        "corruptions": list(names),
        "corrupted_images": int(flat.shape[0]),
        "compile_s": compile_s,
        "median_s": median,
        "times_s": times,
        "corrupted_images_per_s": flat.shape[0] / median,
        "evaluate_compile_s": eval_compile_s,
        "evaluate_median_s": eval_median,
        **check(np.asarray(flat), np.asarray(flat), "corruptions"),
    }


# --------------------------------------------------------------------------- report


def results_table(results: dict[str, Any]) -> str:
    b, r, c = results["bgeom"], results["reference"], results["corruptions"]
    cfg = results["config"]
    lines = [
        f"PRIME on {cfg['batch']} images of {cfg['size']}x{cfg['size']}x3 "
        f"(median of {cfg['repeats']}):",
        f"  bgeom lax.map  {b['map']['median_s']:.3f} s  {b['map']['images_per_s']:8.0f} img/s "
        f"(compile {b['map']['compile_s']:.1f} s)",
        f"  bgeom vmap     {b['vmap']['median_s']:.3f} s  {b['vmap']['images_per_s']:8.0f} img/s "
        f"(compile {b['vmap']['compile_s']:.1f} s)",
        f"  reference      {r['median_s']:.3f} s  {r['images_per_s']:8.0f} img/s "
        f"(first call {r['first_s']:.2f} s, {r['torch_threads']} torch threads)",
        f"  speed-up (lax.map / reference): {results['speedup']:.1f}x (target {TARGET_RATIO:g}x)",
        f"  mean |x' - x|: bgeom {b['map']['mean_abs_change']:.4f}, "
        f"reference {r['mean_abs_change']:.4f}",
        f"corruptions: {len(c['corruptions'])} x 5 severities = {c['corrupted_images']} images in "
        f"{c['median_s']:.3f} s ({c['corrupted_images_per_s']:.0f} img/s, compile "
        f"{c['compile_s']:.1f} s); CNN labels of them {c['evaluate_median_s']:.3f} s",
    ]
    return "\n".join(lines)


def render_section(results: dict[str, Any]) -> str:
    b, r, c = results["bgeom"], results["reference"], results["corruptions"]
    cfg = results["config"]
    machine = results["machine"]
    body = [
        brief_machine_bullet(results),
        versions_bullet(machine, ("torch", "numpy")),
        f"- **Data:** {cfg['batch']} digits resized to {cfg['size']}x{cfg['size']} and tinted "
        "(3 channels, in [0, 1]).",
        "- **Augmentation:** PRIME's default recipe with the reference's CIFAR parameters "
        "(3 chains of depth U{1..3}; filter 3x3, sigma U(0, 4); diffeomorphism cut in "
        "[2, 100]; colour cut 100, T 0.01; Dirichlet(1, 1, 1) and Beta(1, 1) mixing). bgeom: "
        "`jax.jit(augment.PRIME().augment)` (`lax.map` over the images: only the chosen "
        "primitive runs) and `jax.jit(jax.vmap(augment.prime))` (every primitive for every "
        "image and step, then selected). Peer: a port of the reference's `RandomFilter`, "
        "`Diffeo`, `RandomSmoothColor` and `GeneralizedPRIMEModule.aug` in CPU PyTorch, run "
        "as the reference runs them (the whole batch at once, every primitive on every chain "
        "copy at every step, masked; parameters and the deformation field drawn per call).",
        "- **Timing:** median of repeats after a first call (bgeom: compilation, reported "
        "apart; PyTorch: warm-up). Throughput = batch / median.",
        f"- **Sanity:** mean |x' - x| bgeom {b['map']['mean_abs_change']:.4f}, reference "
        f"{r['mean_abs_change']:.4f} (different random draws; the reference's off-centre "
        "filter delta also shifts images).",
        "",
        "| implementation | median (s) | images/s | compile / first call (s) |",
        "|---|---|---|---|",
        f"| bgeom, lax.map | {fmt_seconds(b['map']['median_s'])} | "
        f"{b['map']['images_per_s']:.0f} | {b['map']['compile_s']:.1f} |",
        f"| bgeom, vmap | {fmt_seconds(b['vmap']['median_s'])} | "
        f"{b['vmap']['images_per_s']:.0f} | {b['vmap']['compile_s']:.1f} |",
        f"| reference (PyTorch, {r['torch_threads']} threads) | {fmt_seconds(r['median_s'])} | "
        f"{r['images_per_s']:.0f} | {r['first_s']:.2f} |",
        "",
        f"Speed-up of bgeom (lax.map) over the reference: **{results['speedup']:.1f}x** "
        f"(target {TARGET_RATIO:g}x).",
        "",
        f"Corruption evaluation: the {len(c['corruptions'])} corruptions at 5 severities of the "
        f"batch ({c['corrupted_images']} images) take {fmt_seconds(c['median_s'])} s "
        f"({c['corrupted_images_per_s']:.0f} images/s; compile {c['compile_s']:.1f} s), and a "
        f"CNN's labels of them {fmt_seconds(c['evaluate_median_s'])} s.",
    ]
    return generated_section("prime", "PRIME augmentation: bgeom vs the reference (PyTorch)",
                             results, body, setup=("pip install torch==2.13.0",))  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256, help="images per augmented batch")
    p.add_argument("--size", type=int, default=32, help="image side (images are size x size x 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_repeats(p, 5, "timed calls per implementation (median)")
    add_output_options(p, "prime", "PRIME")
    args = p.parse_args(argv)
    if args.batch < 1 or args.size < 3:
        p.error("--batch must be >= 1 and --size >= 3")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    machine = machine_info(("jax", "jaxlib", "flax", "torch", "numpy", "bgeom"))
    print(machine_line(machine))
    x = make_images(args.batch, args.size)
    results = results_record(
        "prime",
        command_line("bench_prime.py", argv),
        {"batch": args.batch, "size": args.size, "repeats": args.repeats, "threads": args.threads},
        machine,
        load_start,
    )
    results["bgeom"] = bench_bgeom(x, args.repeats)
    results["reference"] = bench_reference(x, args.repeats, args.threads)
    results["corruptions"] = bench_corruptions(x, args.repeats)
    results["speedup"] = results["reference"]["median_s"] / results["bgeom"]["map"]["median_s"]
    publish(results, args, "prime", summary=results_table, render=render_section, what="PRIME")
    return 0


if __name__ == "__main__":
    sys.exit(main())
