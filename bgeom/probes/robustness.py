"""Suite probe "robustness": accuracy under common corruptions, mCE, and margin profiles.

PRIME (Modas et al., ECCV 2022, https://arxiv.org/abs/2112.13547; method:
docs/prime.md) trains on random spectral, spatial and colour primitives and
measures robustness on the common corruptions of Hendrycks & Dietterich
(ICLR 2019, https://arxiv.org/abs/1903.12261). For every model member this
probe reports the test accuracy under each corruption of ``bgeom.corruptions``
at each severity, the mean corruption accuracy, and the corruption errors
normalised by a baseline model's (mCE and relative mCE); and, with the
invariance probe's machinery, the median margin of test images along diagonal
DCT blocks, low to high frequency (docs/subspaces.md), to set the frequency
profile of a PRIME-trained model's boundary beside a standard one's.

The corrupted images are drawn once per dataset (image i, corruption j: key
``fold_in(fold_in(PRNGKey(seed), i), j)``, the same draw at every severity)
and every model on that dataset is evaluated on the same images, as it sees
them (``ctx.as_seen``). mCE is reported for the models on the baseline's
dataset; with an ensemble baseline its errors are the mean over its members.
With ``benchmark`` set (``cifar10_corrupted`` or ``mnist_corrupted``, prepared
with ``bgeom prepare``) the models are evaluated on the benchmark's own
pre-computed images instead (all of its corruptions; the ``corruptions``
option does not apply there). Arrays are saved per member as
``<name>/accuracy`` (corruptions x severities), ``<name>/clean_accuracy``, and
the margins along the DCT blocks, ``<name>/margin`` (1, samples, blocks) with
``<name>/block_starts``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bgeom import augment, subspaces
from bgeom import corruptions as corruptions_lib
from bgeom import data as data_lib
from bgeom.margins import subspace_deepfool
from bgeom.probes import base
from bgeom.probes.base import Member, ProbeOptions, ProbeOutput, SuiteContext, option
from bgeom.probes.invariance import _stats as invariance_stats
from bgeom.probes.invariance import plot_margin_profiles


@dataclasses.dataclass(frozen=True)
class RobustnessOptions(ProbeOptions):
    """Options of the robustness probe (docs/prime.md)."""

    samples: int = option(500, "test images per model (the first ones of the test split)", ge=1)
    corruptions: tuple[str, ...] = option(
        corruptions_lib.NAMES,
        "corruptions applied (saturate only to colour images)",
        choices=corruptions_lib.NAMES,
    )
    severities: tuple[int, ...] = option((1, 2, 3, 4, 5), "severities applied", ge=1, le=5)
    baseline: str = option(
        "", "model whose errors normalise mCE and relative mCE (default: the probe's first)"
    )
    seed: int = option(0, "seed of the corruptions' random draws", ge=0)
    margin_samples: int = option(
        24, "test images of the DCT margin profiles (0: no margin profiles)", ge=0
    )
    block: int = option(2, "side K of the K x K DCT blocks of the margin profiles", ge=1)
    stride: int = option(1, "step between the diagonal DCT blocks", ge=1)
    max_iter: int = option(
        50, "most steps of a subspace margin search (no flip: an infinite margin)", ge=0
    )
    batch_size: int = option(500, "images per compiled batch", ge=1)
    benchmark: str = option(
        "",
        "evaluate on a prepared TFDS corruption benchmark instead of generating the "
        "corruptions: cifar10_corrupted (19 corruptions x the severities) or mnist_corrupted "
        "(15 corruptions, one severity); '' generates bgeom.corruptions",
        choices=("", "cifar10_corrupted", "mnist_corrupted"),
    )
    data_dir: str = option("", "TFDS data_dir of the benchmark ('': TFDS's default)")


@base.register_probe("robustness", RobustnessOptions)
def robustness_probe(
    ctx: SuiteContext, opts: RobustnessOptions, *, probe_id: str, models: tuple[str, ...]
) -> ProbeOutput:
    """Accuracy under common corruptions per severity, mCE vs a baseline, DCT margin profiles."""
    baseline = opts.baseline or models[0]
    if baseline not in models:
        raise ValueError(
            f"probe {probe_id} (robustness): baseline {baseline!r} is not one of its models "
            f"{list(models)}; add it to models or choose one of them."
        )
    out = ProbeOutput(summary={"baseline": baseline})
    accuracy: dict[str, np.ndarray] = {}
    clean: dict[str, float] = {}
    names_of: dict[str, tuple[str, ...]] = {}
    gallery: dict[str, Any] = {}
    severities = opts.severities
    for dataset, keys in _by_dataset(ctx, models).items():
        data = ctx.model_dataset(keys[0])
        x, y = data.x_test[: opts.samples], data.y_test[: opts.samples]
        members = [m for k in keys for m in ctx.members(k)]
        if opts.benchmark:
            names, severities, table, examples = _benchmark_accuracy(
                ctx, members, data.shape, opts, probe_id, dataset, out
            )
        else:
            names = _names(x.shape[-1], opts, probe_id, dataset, out)
            table, examples = _corrupted_accuracy(ctx, members, x, y, names, opts)
        for m in members:
            clean[m.name] = float(np.mean(_predict(ctx, m, x, opts) == y))
            names_of[m.name] = names
        accuracy.update(table)
        if not gallery:  # the figures show the first dataset's first test image
            gallery = {"x": x[0], "names": names, "examples": examples}
    base_members = ctx.members(baseline)
    base_table = np.mean([accuracy[m.name] for m in base_members], axis=0)
    base_clean = float(np.mean([clean[m.name] for m in base_members]))
    base_data = ctx.config["models"][baseline]["dataset"]
    profiles = {}
    for m in ctx.all_members(models):
        out.arrays[f"{m.name}/accuracy"] = accuracy[m.name]
        out.arrays[f"{m.name}/clean_accuracy"] = np.asarray(clean[m.name])
        entry = _entry(accuracy[m.name], clean[m.name], names_of[m.name], severities)
        if ctx.config["models"][m.model]["dataset"] == base_data:
            entry.update(corruption_errors(accuracy[m.name], clean[m.name], base_table, base_clean))
        else:
            out.notes.append(f"{m.name}: no mCE (its test data differ from the baseline's).")
        if opts.margin_samples:
            entry["dct_margins"] = profiles[m.name] = _margin_profile(ctx, m, opts, out)
        out.summary[m.name] = entry
    out.notes += _relative_ce_notes(names_of[base_members[0].name], base_table, base_clean)
    out.figures = {
        "heatmap": plot_accuracy_heatmaps(accuracy, clean, names_of, severities),
        "bars": plot_corruption_bars(accuracy, clean, names_of),
        "primitives": plot_primitives(gallery["x"], opts.seed),
        "corruptions": plot_corruption_examples(
            gallery["x"], gallery["examples"], gallery["names"], severities
        ),
    }
    if profiles:
        out.figures["margins"] = plot_margin_profiles(profiles)
    return out


def _by_dataset(ctx: SuiteContext, models: tuple[str, ...]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in models:
        groups.setdefault(ctx.config["models"][key]["dataset"], []).append(key)
    return groups


def _names(
    channels: int, opts: RobustnessOptions, probe_id: str, dataset: str, out: ProbeOutput
) -> tuple[str, ...]:
    """The corruptions of ``opts`` defined for ``channels``-channel images (a note for the rest)."""
    valid = corruptions_lib.names_for(channels)
    names = tuple(n for n in opts.corruptions if n in valid)
    if not names:
        raise ValueError(
            f"probe {probe_id} (robustness): no corruption of {list(opts.corruptions)} applies "
            f"to the {channels}-channel images of {dataset}; choose from {', '.join(valid)}."
        )
    skipped = [n for n in opts.corruptions if n not in valid]
    if skipped:
        out.notes.append(
            f"dataset {dataset}: {', '.join(skipped)} skipped (defined for colour images only; "
            f"these have {channels} channel(s))."
        )
    return names


def _benchmark_accuracy(
    ctx: SuiteContext,
    members: list[Member],
    shape: tuple[int, ...],
    opts: RobustnessOptions,
    probe_id: str,
    dataset: str,
    out: ProbeOutput,
) -> tuple[tuple[str, ...], tuple[int, ...], dict[str, np.ndarray], np.ndarray]:
    """Accuracy of every member on a prepared TFDS corruption benchmark: the first
    ``samples`` test images of each corruption's config at each severity (the
    benchmark's labels). Returns the corruption names, the severities, the tables
    (corruptions x severities) and the first image of each config."""
    configs = data_lib.corruption_configs(opts.benchmark)
    if opts.benchmark == "cifar10_corrupted":
        severities = tuple(opts.severities)
        picked = {n: tuple(c[s - 1] for s in severities) for n, c in configs.items()}
    else:
        severities = (1,)
        picked = dict(configs)
        if tuple(opts.severities) != (1, 2, 3, 4, 5):
            out.notes.append("mnist_corrupted has one severity per corruption; severities ignored.")
    names = tuple(picked)
    correct = {m.name: np.zeros((len(names), len(severities))) for m in members}
    examples = np.zeros((len(names), len(severities), *shape), np.float32)
    for i, name in enumerate(names):
        for j, config in enumerate(picked[name]):
            bench = data_lib.load(
                f"{opts.benchmark}/{config}", data_dir=opts.data_dir or None, max_test=opts.samples
            )
            if bench.shape != tuple(shape):
                raise ValueError(
                    f"probe {probe_id} (robustness): {opts.benchmark} images have shape "
                    f"{bench.shape}, but the models of {dataset} take {tuple(shape)}; evaluate "
                    "models trained on the benchmark's clean dataset (cifar10 / mnist)."
                )
            examples[i, j] = bench.x_test[0]
            for m in members:
                pred = _predict(ctx, m, bench.x_test, opts)
                correct[m.name][i, j] = np.mean(pred == bench.y_test)
    out.notes.append(
        f"dataset {dataset}: evaluated on the prepared {opts.benchmark} benchmark "
        f"({len(names)} corruptions x {len(severities)} severities; the first {opts.samples} "
        "test images of each), not on generated corruptions."
    )
    return names, severities, correct, examples


def image_keys(seed: int, n: int) -> jax.Array:
    """The corruption keys of test images 0..n-1: ``fold_in(PRNGKey(seed), i)``; corruption
    j of image i draws from ``fold_in(key_i, j)`` (``corruptions.apply_all``)."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n))


@functools.lru_cache(maxsize=32)
def _corrupt_all(names: tuple[str, ...]) -> Any:
    """``fn(key, x, severity) -> (len(names), H, W, C)``, one object per list of corruptions,
    so that ``ctx.map`` compiles it once for every severity."""
    return lambda k, xi, s: corruptions_lib.apply_all(k, xi, s, names)


def _corrupted_accuracy(
    ctx: SuiteContext,
    members: list[Member],
    x: np.ndarray,
    y: np.ndarray,
    names: tuple[str, ...],
    opts: RobustnessOptions,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Accuracy of every member per corruption and severity, and the first image's
    corrupted copies (corruptions, severities, H, W, C). Images are corrupted once,
    ``batch_size`` at a time, and every member is evaluated on them."""
    keys = np.asarray(image_keys(opts.seed, len(x)))
    correct = {m.name: np.zeros((len(names), len(opts.severities))) for m in members}
    examples = np.zeros((len(names), len(opts.severities), *x.shape[1:]), x.dtype)
    for j, severity in enumerate(opts.severities):
        for start in range(0, len(x), opts.batch_size):
            rows = slice(start, start + opts.batch_size)
            xc = ctx.map(
                _corrupt_all(names),
                keys[rows],
                x[rows],
                np.int32(severity),
                in_axes=(0, 0, None),
                batch_size=opts.batch_size,
                desc=f"corruptions, severity {severity}",
            )
            if start == 0:
                examples[:, j] = xc[0]
            flat = xc.reshape(-1, *x.shape[1:])  # image-major: (image, corruption)
            for m in members:
                pred = _predict(ctx, m, flat, opts).reshape(len(xc), len(names))
                correct[m.name][:, j] += np.sum(pred == y[rows, None], axis=0)
    return {k: v / len(x) for k, v in correct.items()}, examples


def _predict(
    ctx: SuiteContext, member: Member, x: np.ndarray, opts: RobustnessOptions
) -> np.ndarray:
    """The labels ``member`` predicts for images ``x``, as its model sees them."""
    return ctx.map(
        _predictor(member.apply_fn),
        member.params,
        ctx.as_seen(member.model, x),
        in_axes=(None, 0),
        batch_size=opts.batch_size,
        desc=f"evaluate {member.name}",
    )


@functools.lru_cache(maxsize=32)
def _predictor(apply_fn: Any) -> Any:
    """``fn(params, x) -> label`` for ``apply_fn``, one object per architecture (compiled once)."""
    return lambda p, xi: jnp.argmax(apply_fn(p, xi))


@functools.lru_cache(maxsize=32)
def _block_margins(apply_fn: Any, max_iter: int) -> Any:
    """``fn(params, blocks, x)``: the subspace margins of one image along every block."""
    return lambda p, blocks, xi: jax.vmap(
        lambda b: subspace_deepfool(apply_fn, p, xi, b, max_iter=max_iter)
    )(blocks)


def _margin_profile(
    ctx: SuiteContext, member: Member, opts: RobustnessOptions, out: ProbeOutput
) -> dict[str, Any]:
    """Margins of test images along the diagonal DCT blocks (``subspace_deepfool`` through
    ``ctx.map``, compiled once per architecture), summarised as the invariance probe does."""
    x, _ = ctx.test_inputs(member.model, opts.margin_samples)
    shape = x.shape[1:]
    blocks = subspaces.dct_blocks(shape, opts.block, opts.stride)
    starts = subspaces.block_starts(shape, opts.block, opts.stride)
    res = ctx.map(
        _block_margins(member.apply_fn, opts.max_iter),
        member.params,
        blocks,
        x,
        in_axes=(None, None, 0),
        batch_size=opts.batch_size,
        desc=f"DCT margins {member.name}",
    )
    margin = np.asarray(res.margin)[None]  # (member, samples, blocks)
    out.arrays[f"{member.name}/margin"] = margin
    out.arrays[f"{member.name}/block_starts"] = starts
    return {
        "samples": int(len(x)),
        "block": opts.block,
        "stride": opts.stride,
        "block_starts": starts.tolist(),
        **invariance_stats(margin),
    }


def corruption_errors(
    accuracy: np.ndarray, clean: float, base_accuracy: np.ndarray, base_clean: float
) -> dict[str, Any]:
    """Corruption errors of a model against a baseline (Hendrycks & Dietterich).

    With errors ``E = 1 - accuracy`` (corruptions x severities):
    ``CE_c = sum_s E_sc / sum_s E^base_sc`` and the relative
    ``rCE_c = sum_s (E_sc - E_clean) / sum_s (E^base_sc - E^base_clean)``; mCE and
    relative mCE are their means over corruptions, in percent (the baseline
    scores 100). A corruption whose denominator is not positive has no CE
    (``None``) and is left out of the mean.
    """
    err, base_err = 1.0 - np.asarray(accuracy), 1.0 - np.asarray(base_accuracy)
    num, den = err.sum(1), base_err.sum(1)
    rel_num = (err - (1.0 - clean)).sum(1)
    rel_den = (base_err - (1.0 - base_clean)).sum(1)
    ce = [100.0 * a / b if b > 1e-9 else None for a, b in zip(num, den, strict=True)]
    rel = [100.0 * a / b if b > 1e-9 else None for a, b in zip(rel_num, rel_den, strict=True)]
    return {
        "ce": ce,
        "mce": base.mean([v for v in ce if v is not None]),
        "relative_ce": rel,
        "relative_mce": base.mean([v for v in rel if v is not None]),
    }


def _relative_ce_notes(names: tuple[str, ...], base_table: np.ndarray, base_clean: float) -> list:
    """Caveats of relative CE: it divides by the baseline's drop in accuracy."""
    drop = base_clean - base_table.mean(1)  # mean over severities
    notes = []
    undefined = [n for n, d in zip(names, drop, strict=True) if d <= 1e-9]
    if undefined:
        notes.append(
            f"relative CE undefined for {', '.join(undefined)}: the baseline's error there is "
            "no larger than its clean error; left out of relative mCE."
        )
    small = [f"{n} ({100 * d:.2f})" for n, d in zip(names, drop, strict=True) if 1e-9 < d < 0.01]
    if small:
        notes.append(
            "relative CE divides by the baseline's drop in accuracy, below 1 point (mean over "
            f"severities) for {', '.join(small)}: there a few images decide the ratio, so "
            "relative mCE is noisy; mCE and the accuracies are the robust figures."
        )
    return notes


def _entry(
    table: np.ndarray,
    clean: float,
    names: tuple[str, ...],
    severities: tuple[int, ...],
) -> dict[str, Any]:
    by_family = {
        family: base.mean(table[[i for i, n in enumerate(names) if n in members]])
        for family, members in corruptions_lib.FAMILIES.items()
        if any(n in members for n in names)
    }
    worst = int(np.argmin(table.mean(1)))
    return {
        "clean_accuracy": clean,
        "mean_corruption_accuracy": base.mean(table),
        "worst_corruption": names[worst],
        "worst_corruption_accuracy": float(table[worst].mean()),
        "corruptions": list(names),
        "severities": list(severities),
        "accuracy": {n: table[i].tolist() for i, n in enumerate(names)},
        "mean_accuracy_per_corruption": dict(zip(names, table.mean(1).tolist(), strict=True)),
        "mean_accuracy_per_severity": table.mean(0).tolist(),
        "mean_accuracy_per_family": by_family,
    }


# ------------------------------------------------------------------ figures


def plot_accuracy_heatmaps(
    accuracy: dict[str, np.ndarray],
    clean: dict[str, float],
    names_of: dict[str, tuple[str, ...]],
    severities: tuple[int, ...],
):
    """Accuracy per corruption (rows) and severity (columns), one panel per member."""
    import matplotlib.pyplot as plt

    k = len(accuracy)
    rows = max(len(n) for n in names_of.values())
    fig, axes = plt.subplots(
        1, k, figsize=(2.0 + 2.6 * k, 0.9 + 0.32 * rows), squeeze=False, constrained_layout=True
    )
    image = None
    for ax, (name, table) in zip(axes[0], accuracy.items(), strict=True):
        image = ax.imshow(table, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(table):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if v < 0.6 else "black")  # fmt: skip
        ax.set_xticks(range(len(severities)), [str(s) for s in severities])
        ax.set_yticks(range(len(names_of[name])), names_of[name], fontsize=7)
        ax.set_xlabel("severity")
        ax.set_title(
            f"{name}\nclean {100 * clean[name]:.1f}%, mean {100 * table.mean():.1f}%", fontsize=8
        )
        if ax is not axes[0][0]:
            ax.set_yticklabels([])
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    return fig


def plot_corruption_bars(
    accuracy: dict[str, np.ndarray],
    clean: dict[str, float],
    names_of: dict[str, tuple[str, ...]],
):
    """Mean accuracy over severities per corruption, one bar per member (clean and mean first)."""
    import matplotlib.pyplot as plt

    labels = ["clean", "mean"] + list(max(names_of.values(), key=len))
    width_in = min(12.0, 2.0 + 0.3 * len(labels) * len(accuracy))
    fig, ax = plt.subplots(figsize=(max(6.5, width_in), 3.6))
    width = 0.8 / len(accuracy)
    for j, (name, table) in enumerate(accuracy.items()):
        per = dict(zip(names_of[name], table.mean(1), strict=True))
        values = [clean[name], table.mean()] + [per.get(n, np.nan) for n in labels[2:]]
        ax.bar(np.arange(len(labels)) + (j - (len(accuracy) - 1) / 2) * width, values, width,
               label=name)  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (mean over severities)")
    ax.set_ylim(0, 1)
    ax.axvline(1.5, color="grey", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Accuracy under each corruption")
    fig.tight_layout()
    return fig


@functools.partial(jax.jit, static_argnames="draws")
def _primitive_panels(key: jax.Array, x: jax.Array, draws: int) -> tuple[jax.Array, jax.Array]:
    """Each primitive of ``augment.PRIMITIVES`` once, and ``draws`` PRIME mixtures, of ``x``."""
    singles = [
        fn(jax.random.fold_in(key, i), x) for i, fn in enumerate(augment.PRIMITIVES.values())
    ]
    mixes = jax.lax.map(lambda k: augment.prime(k, x), jax.random.split(key, draws))
    return jnp.stack(singles), mixes


def plot_primitives(x: np.ndarray, seed: int, draws: int = 3):
    """One test image, each PRIME primitive applied to it, and ``draws`` PRIME mixtures."""
    import matplotlib.pyplot as plt

    from bgeom.report import _image

    singles, mixes = _primitive_panels(jax.random.PRNGKey(seed), jnp.asarray(x), draws)
    panels = [("image", x)]
    panels += [(name, img) for name, img in zip(augment.PRIMITIVES, singles, strict=True)]
    panels += [(f"PRIME {d + 1}", img) for d, img in enumerate(mixes)]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.4 * len(panels), 1.8), squeeze=False)
    for ax, (title, img) in zip(axes[0], panels, strict=True):
        _image(ax, np.asarray(img), vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    fig.suptitle("PRIME primitives and mixtures of one test image", fontsize=9)
    fig.tight_layout()
    return fig


def plot_corruption_examples(
    x: np.ndarray, examples: np.ndarray, names: tuple[str, ...], severities: tuple[int, ...]
):
    """One image clean and under every corruption (rows) at every severity (columns);
    ``examples`` has shape (corruptions, severities, H, W, C)."""
    import matplotlib.pyplot as plt

    from bgeom.report import _image

    fig, axes = plt.subplots(
        len(names),
        len(severities) + 1,
        figsize=(1.2 * (len(severities) + 1) + 1.2, 1.15 * len(names)),
        squeeze=False,
    )
    for i, name in enumerate(names):
        _image(axes[i, 0], x, vmin=0, vmax=1)
        axes[i, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        for j, s in enumerate(severities):
            _image(axes[i, j + 1], examples[i, j], vmin=0, vmax=1)
            if i == 0:
                axes[i, j + 1].set_title(f"severity {s}", fontsize=8)
    axes[0, 0].set_title("clean", fontsize=8)
    fig.tight_layout()
    return fig
