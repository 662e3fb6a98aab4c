"""Suite probe "sparsity": SparseFool's sparse perturbations against DeepFool's, per member.

Method: docs/sparsefool.md. For every model member, on the first ``samples``
test images as the model sees them:

1. SparseFool (``bgeom.sparsefool`` through ``ctx.batched``: every outer
   iteration a boundary point and a greedy linear solve, finished images leave
   the batch) inside the box ``[0, 1]`` intersected with ``x_0 +- delta``;
2. DeepFool (``bgeom.deepfool``, clipped to ``[0, 1]``) on the same images,
   the minimal L2 perturbation SparseFool is compared with, as one
   ``jax.jit(jax.vmap(...))`` sweep (``ctx.map``).

Reported per member: the fooling rate, the fraction of pixels changed (a pixel
counts once whatever its channels; median and quartiles over the fooled
images), SparseFool's outer iterations, the L2 norms of both perturbations,
DeepFool's fraction of pixels changed, the status counts of both, and per
predicted class how often each pixel is changed (the paper's link between
sparse perturbations and the discriminative features of a class). Arrays are
saved per member as ``<name>/<field>``, one entry per image: SparseFool's
``label``, ``adv_label``, ``iterations``, ``converged``, ``status``,
``pixels_changed``, ``l2`` and ``perturbation``, DeepFool's as
``<name>/deepfool/<field>`` (no perturbation), ``true_label``; and
``pixel_map`` (classes, H, W), ``pixel_map_images`` (fooled images per
predicted class) and ``example_index`` (the images drawn).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bgeom import sparse
from bgeom.margins import STATUS_NAMES as DEEPFOOL_STATUS_NAMES
from bgeom.margins import deepfool
from bgeom.probes import base
from bgeom.probes.base import Member, ProbeOptions, ProbeOutput, SuiteContext, option
from bgeom.sparse import sparsefool

#: The pixel range both searches stay in (images outside it widen it, with a note).
BOUNDS = (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class SparsityOptions(ProbeOptions):
    """Options of the sparsity probe (docs/sparsefool.md)."""

    samples: int = option(
        100, "test images per model member (the first ones of the test split)", ge=1
    )
    lambda_: float = option(
        3.0, "SparseFool's anchor factor: the hyperplane passes x_i + lambda_ (z - x_i)", gt=0
    )
    max_iter: int = option(20, "most SparseFool outer iterations (a boundary point each)", ge=1)
    epsilon: float = option(
        0.02, "SparseFool's final overshoot: x_adv = x_0 + (1 + epsilon)(x_i - x_0)", ge=0
    )
    delta: float = option(
        1.0,
        "largest change of one pixel value in [0, 1] units; 1 is the whole range (no limit), "
        "the paper's 50/255 and 25/255 are 0.196 and 0.098",
        gt=0,
        le=1,
    )
    candidates: int = option(
        10, "DeepFool candidate classes (SparseFool's boundary points and the comparison)", ge=2
    )
    overshoot: float = option(0.02, "DeepFool overshoot (both uses)", ge=0)
    deepfool_max_iter: int = option(
        50, "most DeepFool steps per search (SparseFool's boundary points and the comparison)", ge=1
    )
    batch_size: int = option(128, "examples in flight at once (slots of the batched driver)", ge=1)
    examples: int = option(4, "perturbations drawn per member in the examples figure", ge=0)


@base.register_probe("sparsity", SparsityOptions)
def sparsity_probe(
    ctx: SuiteContext, opts: SparsityOptions, *, probe_id: str, models: tuple[str, ...]
) -> ProbeOutput:
    """SparseFool's sparse perturbations against DeepFool's: pixels changed, L2, per-class maps."""
    out = ProbeOutput(summary={})
    scatter: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for member in ctx.all_members(models):
        name = member.name
        x, y = ctx.test_inputs(member.model, opts.samples)
        x = np.asarray(x, np.float32)
        bounds = _bounds(x)
        if bounds != BOUNDS:
            out.notes.append(
                f"{name}: the images as the model sees them span [{bounds[0]:.3g}, "
                f"{bounds[1]:.3g}], outside [0, 1]; both searches use that box instead."
            )
        sf, df = _searches(ctx, member, x, opts, bounds)
        num_classes = ctx.model_dataset(member.model).num_classes
        pixel_map, counts = _pixel_maps(sf, num_classes)
        for field, value in sf.items():
            out.arrays[f"{name}/{field}"] = value
        for field, value in df.items():
            out.arrays[f"{name}/deepfool/{field}"] = value
        out.arrays[f"{name}/true_label"] = np.asarray(y)
        out.arrays[f"{name}/pixel_map"] = pixel_map
        out.arrays[f"{name}/pixel_map_images"] = counts
        pick = np.flatnonzero(sf["converged"])[: min(opts.examples, len(x))]
        out.arrays[f"{name}/example_index"] = pick
        out.summary[name] = _summary(sf, df, counts, x, y)
        fooled = sf["converged"]
        if not fooled.all():
            names = ", ".join(
                f"{n} {int(np.sum(sf['status'] == s))}"
                for s, n in enumerate(sparse.STATUS_NAMES)
                if s and np.any(sf["status"] == s)
            )
            out.notes.append(
                f"{name}: SparseFool did not fool {int(np.sum(~fooled))} of {fooled.size} images "
                f"({names}); they are left out of every pixel and L2 statistic."
            )
        if not df["converged"].all():
            out.notes.append(
                f"{name}: DeepFool did not flip {int(np.sum(~df['converged']))} of "
                f"{fooled.size} images within {opts.deepfool_max_iter} steps; they are left out "
                "of DeepFool's statistics."
            )
        scatter[name] = {
            "sparsefool": (sf["pixels_changed"][fooled], sf["l2"][fooled]),
            "deepfool": (df["pixels_changed"][df["converged"]], df["l2"][df["converged"]]),
        }
        maps[name] = (pixel_map, counts)
        if len(pick):
            out.figures[f"examples-{name}"] = plot_sparse_examples(
                {
                    "x": x[pick],
                    "perturbation": sf["perturbation"][pick],
                    "label": sf["label"][pick],
                    "adv_label": sf["adv_label"][pick],
                    "pixels_changed": sf["pixels_changed"][pick],
                    "l2": sf["l2"][pick],
                },
                title=name,
            )
    out.figures["pixel_maps"] = plot_pixel_maps(maps)
    out.figures["l0_l2"] = plot_l0_l2(scatter)
    if opts.delta < 1.0:
        out.notes.append(
            f"delta = {opts.delta:g}: no pixel value moves by more than that, so a search may "
            "need more pixels, or fail (status max_iter)."
        )
    return out


def _bounds(x: np.ndarray) -> tuple[float, float]:
    """``BOUNDS``, widened to the images' own range where they leave it."""
    lo, hi = float(np.min(x)), float(np.max(x))
    return (min(BOUNDS[0], lo), max(BOUNDS[1], hi))


def _changed(r: np.ndarray) -> np.ndarray:
    """Per image and pixel (H, W): whether any channel changed; shape (n, H, W)."""
    return np.any(r != 0, axis=-1)


def _searches(
    ctx: SuiteContext,
    member: Member,
    x: np.ndarray,
    opts: SparsityOptions,
    bounds: tuple[float, float],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """SparseFool and DeepFool on every image of ``x``: their per-image fields as NumPy arrays."""
    res = ctx.batched(
        sparsefool,
        member,
        x,
        batch_size=opts.batch_size,
        desc=f"sparsefool {member.name}",
        lambda_=opts.lambda_,
        max_iter=opts.max_iter,
        epsilon=opts.epsilon,
        bounds=bounds,
        delta=None if opts.delta >= bounds[1] - bounds[0] else opts.delta,
        candidates=opts.candidates,
        overshoot=opts.overshoot,
        deepfool_max_iter=opts.deepfool_max_iter,
    )
    n = len(x)
    r = np.asarray(res.perturbation, np.float32)
    sf = {
        "label": np.asarray(res.label),
        "adv_label": np.asarray(res.adv_label),
        "iterations": np.asarray(res.iterations),
        "converged": np.asarray(res.converged, bool),
        "status": np.asarray(res.status),
        "pixels_changed": np.asarray(res.pixels_changed, np.float64),
        "l2": np.linalg.norm(r.reshape(n, -1).astype(np.float64), axis=1),
        "perturbation": r,
    }
    # DeepFool as one jit(vmap) sweep: on a few small images compaction saves no
    # work, while the batched driver would compile its step again for every bucket
    # size the shrinking batch passes through.
    ref = ctx.map(
        lambda p, xi: deepfool(
            member.apply_fn,
            p,
            xi,
            candidates=opts.candidates,
            overshoot=opts.overshoot,
            max_iter=opts.deepfool_max_iter,
            bounds=bounds,
        ),
        member.params,
        x,
        in_axes=(None, 0),
        batch_size=opts.batch_size,
        desc=f"deepfool {member.name}",
    )
    rd = np.asarray(ref.perturbation, np.float32)
    df = {
        "label": np.asarray(ref.label),
        "adv_label": np.asarray(ref.adv_label),
        "iterations": np.asarray(ref.iterations),
        "converged": np.asarray(ref.converged, bool),
        "status": np.asarray(ref.status),
        "pixels_changed": _changed(rd).reshape(n, -1).mean(axis=1).astype(np.float64),
        "l2": np.linalg.norm(rd.reshape(n, -1).astype(np.float64), axis=1),
    }
    return sf, df


def _pixel_maps(sf: dict[str, np.ndarray], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each pixel is changed, per predicted class, over the fooled images.

    Returns ``(maps, images)``: ``maps`` (num_classes, H, W), the fraction of the
    fooled images of each predicted class whose perturbation changes the pixel
    (NaN for a class without fooled images); ``images`` (num_classes,), their number.
    """
    changed = _changed(sf["perturbation"])
    fooled, label = sf["converged"], sf["label"]
    maps = np.full((num_classes, *changed.shape[1:]), np.nan)
    images = np.zeros(num_classes, np.int64)
    for c in range(num_classes):
        rows = fooled & (label == c)
        images[c] = int(rows.sum())
        if images[c]:
            maps[c] = changed[rows].mean(axis=0)
    return maps, images


def _counts(status: np.ndarray, names: tuple[str, ...]) -> dict[str, int]:
    return {n: int(np.sum(status == s)) for s, n in enumerate(names)}


def _summary(
    sf: dict[str, np.ndarray],
    df: dict[str, np.ndarray],
    images_per_class: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
) -> dict[str, Any]:
    fooled, df_ok = sf["converged"], df["converged"]
    both = fooled & df_ok
    pixels = int(np.prod(x.shape[1:3]))
    med_sf = base.median(sf["pixels_changed"][fooled])
    med_df = base.median(df["pixels_changed"][df_ok])
    with np.errstate(divide="ignore", invalid="ignore"):
        l2_ratio = sf["l2"][both] / df["l2"][both]
    label = sf["label"]
    return {
        "samples": int(len(x)),
        "pixels": pixels,
        "accuracy": base.fraction(label == np.asarray(y)),
        "fooling_rate": base.fraction(fooled),
        "not_fooled": int(np.sum(~fooled)),
        "status_counts": _counts(sf["status"], sparse.STATUS_NAMES),
        "median_pixels_changed": med_sf,
        "pixels_changed_quartiles": base.quantiles(sf["pixels_changed"][fooled], [0.25, 0.75]),
        "median_pixel_count": None if med_sf is None else med_sf * pixels,
        "mean_pixels_changed": base.mean(sf["pixels_changed"][fooled]),
        "median_iterations": base.median(sf["iterations"]),
        "max_iterations": int(np.max(sf["iterations"])) if len(x) else 0,
        "median_l2": base.median(sf["l2"][fooled]),
        "deepfool_median_l2": base.median(df["l2"][df_ok]),
        "median_l2_ratio": base.median(l2_ratio),
        "deepfool_fooling_rate": base.fraction(df_ok),
        "deepfool_median_pixels_changed": med_df,
        "deepfool_pixels_changed_quartiles": base.quantiles(
            df["pixels_changed"][df_ok], [0.25, 0.75]
        ),
        "pixels_changed_ratio": (None if med_sf is None or not med_df else med_sf / med_df),
        "deepfool_median_iterations": base.median(df["iterations"]),
        "deepfool_status_counts": _counts(df["status"], DEEPFOOL_STATUS_NAMES),
        "per_class": {
            int(c): {
                "images": int(images_per_class[c]),
                "median_pixels_changed": base.median(sf["pixels_changed"][fooled & (label == c)]),
            }
            for c in range(len(images_per_class))
            if images_per_class[c]
        },
    }


# ------------------------------------------------------------------ figures


def _image(ax: Any, img: np.ndarray) -> None:
    """An image with values in [0, 1] (grey for one channel), without ticks."""
    img = np.clip(np.asarray(img), 0, 1)
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_sparse_examples(examples: dict[str, np.ndarray], title: str = ""):
    """Rows of (image, perturbation, perturbed image), with labels, pixels changed and L2.

    The perturbation is drawn on a symmetric diverging scale (red +, blue -)
    normalised per row; unchanged pixels are white. The figure functions here
    import only pyplot (not ``bgeom.report``, which selects the Agg backend), so
    notebooks can use them.
    """
    import matplotlib.pyplot as plt

    x = np.asarray(examples["x"])
    r = np.asarray(examples["perturbation"])
    k = len(x)
    fig, axes = plt.subplots(k, 3, figsize=(5.4, 1.8 * k + 0.4), squeeze=False)
    pixels = int(np.prod(x.shape[1:3]))
    for i in range(k):
        _image(axes[i, 0], x[i])
        rr = r[i].mean(-1)
        lim = float(np.max(np.abs(rr))) or 1.0
        axes[i, 1].imshow(rr, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[i, 1].set_xticks([])
        axes[i, 1].set_yticks([])
        _image(axes[i, 2], x[i] + r[i])
        frac = float(examples["pixels_changed"][i])
        axes[i, 0].set_ylabel(f"label {int(examples['label'][i])}", fontsize=8)
        axes[i, 1].set_title(
            f"{round(frac * pixels)} px ({frac:.1%}), L2 {float(examples['l2'][i]):.2f}",
            fontsize=8,
        )
        axes[i, 2].set_title(f"x + r -> {int(examples['adv_label'][i])}", fontsize=8)
    fig.suptitle(f"SparseFool perturbations: {title}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_pixel_maps(maps: dict[str, tuple[np.ndarray, np.ndarray]]):
    """Per member (rows) and predicted class (columns): how often SparseFool changes each pixel."""
    import matplotlib.pyplot as plt

    names = list(maps)
    num_classes = max((m.shape[0] for m, _ in maps.values()), default=1)
    fig, axes = plt.subplots(
        len(names),
        num_classes,
        figsize=(1.1 * num_classes + 0.6, 1.3 * len(names) + 0.5),
        squeeze=False,
    )
    top = max((float(np.nanmax(m)) for m, _ in maps.values() if np.isfinite(m).any()), default=1.0)
    image = None
    for row, name in enumerate(names):
        pixel_map, images = maps[name]
        for c in range(num_classes):
            ax = axes[row, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images) and images[c]:
                image = ax.imshow(pixel_map[c], cmap="magma", vmin=0, vmax=top or 1.0)
            ax.set_title(f"{c} (n={int(images[c]) if c < len(images) else 0})", fontsize=7)
        axes[row, 0].set_ylabel(name, fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of images")
    fig.suptitle("Pixels SparseFool changes, per predicted class", fontsize=10)
    return fig


def plot_l0_l2(scatter: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]):
    """Fraction of pixels changed against L2 norm: SparseFool (dots) and DeepFool (crosses)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for (name, s), color in zip(scatter.items(), plt.cm.tab10.colors, strict=False):
        l0, l2 = s["sparsefool"]
        ax.plot(l0, l2, "o", color=color, ms=3, alpha=0.7, label=f"{name} SparseFool")
        l0, l2 = s["deepfool"]
        ax.plot(l0, l2, "x", color=color, ms=4, alpha=0.7, label=f"{name} DeepFool")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of pixels changed (L0)")
    ax.set_ylabel("||r||_2")
    ax.set_title("Sparse (SparseFool) against minimal L2 (DeepFool) perturbations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
