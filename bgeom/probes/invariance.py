"""Suite probe "invariance": margins along DCT subspaces, low to high frequency.

The experiment of "Hold me tight!" (Ortiz-Jimenez et al., NeurIPS 2020,
https://arxiv.org/abs/2002.06349; method: docs/subspaces.md): for every model
member, the margin of test images along each diagonal K x K DCT block.
Networks have small margins along the directions the data discriminates along
and very large ones (invariance) along the rest. Models trained on
frequency-flipped data (``augment = "flip"``) are probed on flipped images and
should show the mirrored profile; low-pass training (``augment = {name =
"low_pass", ...}``) and L2 adversarial training (``augment = {name = "pgd", eps
= 2.0}``) move the curve as the paper reports. On synthetic data
(``bgeom.data.synthetic``) the probe also measures the margin along the one
discriminative direction u, which should be about the construction's eps,
against the margins along the DCT blocks orthogonal to u. Arrays are saved per
member as ``<name>/<field>`` with a leading axis of length 1 (the member).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bgeom import subspaces as subspaces_lib
from bgeom.margins import subspace_margins
from bgeom.probes import base
from bgeom.probes.base import Member, ProbeOptions, ProbeOutput, SuiteContext, option


@dataclasses.dataclass(frozen=True)
class InvarianceOptions(ProbeOptions):
    """Options of the invariance probe (docs/subspaces.md, docs/margins.md)."""

    samples: int = option(100, "test images per model (the first ones of the test split)", ge=1)
    block: int = option(8, "side K of the K x K DCT blocks", ge=1)
    stride: int = option(1, "step between the diagonal DCT blocks", ge=1)
    candidates: int = option(10, "DeepFool candidate classes", ge=2)
    overshoot: float = option(0.02, "DeepFool overshoot", ge=0)
    max_iter: int = option(
        100, "most steps of a subspace search (no flip: an infinite margin)", ge=0
    )
    batch_size: int = option(50, "images in flight at once, each with every block", ge=1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two profiles (average ranks for ties; NaN if constant)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _stats(margin: np.ndarray) -> dict[str, Any]:
    """Median and quartiles per subspace over samples (and members); inf = no flip."""
    flat = margin.reshape(-1, margin.shape[-1])
    q25, med, q75 = base.quantiles(flat, [0.25, 0.5, 0.75], axis=0)
    return {
        "median": med,
        "q25": q25,
        "q75": q75,
        "flipped_fraction": base.flipped_fraction(flat, axis=0),
    }


def _margins(
    ctx: SuiteContext, member: Member, x: np.ndarray, subspace, opts: InvarianceOptions, desc: str
) -> dict[str, np.ndarray]:
    """Subspace margins of ``member``: every field with a leading member axis, (1, n, M)."""
    res = ctx.batched(
        subspace_margins,
        member,
        x,
        subspace,
        batch_size=opts.batch_size * len(subspace),
        desc=f"{desc} {member.name}",
        candidates=opts.candidates,
        overshoot=opts.overshoot,
        max_iter=opts.max_iter,
    )
    return {f: np.asarray(getattr(res, f))[None] for f in res._fields}


@base.register_probe("invariance", InvarianceOptions)
def invariance_probe(
    ctx: SuiteContext, opts: InvarianceOptions, *, probe_id: str, models: tuple[str, ...]
) -> ProbeOutput:
    """Margins along DCT frequency blocks, low to high, per model ("Hold me tight!")."""
    out = ProbeOutput(summary={})
    profiles: dict[str, dict[str, Any]] = {}
    synthetic: dict[str, dict[str, Any]] = {}
    samples: dict[str, np.ndarray] = {}
    for member in ctx.all_members(models):
        entry, samples[member.name] = _profile(ctx, member, opts, out)
        if "synthetic" in entry:
            synthetic[member.name] = entry["synthetic"]
        out.summary[member.name] = profiles[member.name] = entry

    mirrors = _mirrors(profiles)
    if mirrors:
        out.summary["mirror_spearman"] = mirrors
    natural = {k: v for k, v in profiles.items() if k not in synthetic}
    if natural:
        out.figures["profile"] = plot_margin_profiles(natural)
    if synthetic:
        out.figures["synthetic"] = plot_synthetic_profiles(
            {k: profiles[k] for k in synthetic}, synthetic
        )
    out.figures["inputs"] = plot_model_inputs(samples)
    return out


def _profile(
    ctx: SuiteContext, member: Member, opts: InvarianceOptions, out: ProbeOutput
) -> tuple[dict[str, Any], np.ndarray]:
    """The margin profile of one member (summary entry), and its first input image."""
    key, name = member.model, member.name
    x, _ = ctx.test_inputs(key, opts.samples)
    shape = x.shape[1:]
    blocks = subspaces_lib.dct_blocks(shape, opts.block, opts.stride)
    starts = subspaces_lib.block_starts(shape, opts.block, opts.stride)
    res = _margins(ctx, member, x, blocks, opts, "subspace margins")
    for field in ("margin", "converged", "iterations", "label", "adv_label"):
        out.arrays[f"{name}/{field}"] = res[field]
    out.arrays[f"{name}/block_starts"] = starts
    spec = ctx.config["models"][key]
    entry = {
        "dataset": spec["dataset"],
        "augment": spec.get("augment"),
        "samples": int(len(x)),
        "block": opts.block,
        "stride": opts.stride,
        "block_starts": starts.tolist(),
        "test_accuracy": np.atleast_1d(ctx.model(key).test_accuracy)[[member.index]].tolist(),
        **_stats(res["margin"]),
        "median_iterations": base.median(res["iterations"]),
    }
    not_flipped = int(np.sum(~res["converged"]))
    if not_flipped:
        out.notes.append(
            f"{name}: {not_flipped} of {res['converged'].size} (sample, block) searches did not "
            f"flip the label within max_iter={opts.max_iter}; their margin counts as "
            "infinite (larger than any finite one) in the medians and quartiles."
        )
    along_u = _synthetic(ctx, member, x, blocks, res["margin"], opts, out)
    if along_u is not None:
        entry["synthetic"] = along_u
    return entry, x[0]


def _synthetic(
    ctx: SuiteContext,
    member: Member,
    x: np.ndarray,
    blocks,
    margin: np.ndarray,
    opts: InvarianceOptions,
    out: ProbeOutput,
) -> dict[str, Any] | None:
    """Synthetic data: the margin along the discriminative direction u vs the DCT blocks."""
    data = ctx.model_dataset(member.model)
    direction = data.info.get("direction") if data.name == "synthetic" else None
    if direction is None:
        return None
    u = subspaces_lib.from_basis(np.asarray(direction, np.float32)[None], name="u")
    along = _margins(ctx, member, x, subspaces_lib.stack([u]), opts, "margin along u")
    margin_u = along["margin"][..., 0]
    out.arrays[f"{member.name}/margin_along_u"] = margin_u
    # Blocks orthogonal to u: those that do not contain u's DCT support.
    support = np.abs(np.asarray(subspaces_lib.dct2(np.asarray(direction))))[..., 0] > 1e-6
    orth = np.array([not np.any(support & (np.asarray(m) > 0)) for m in blocks.mask])
    eps = float(data.info["eps"])
    med_u = base.censored_median(margin_u)
    med_orth = base.censored_median(margin[..., orth]) if orth.any() else None
    return {
        "eps": eps,
        "median_margin_along_u": med_u,
        "relative_error_vs_eps": abs(med_u - eps) / eps if med_u is not None else None,
        "orthogonal_blocks": np.flatnonzero(orth).tolist(),
        "median_margin_orthogonal_blocks": med_orth,
        "ratio_orthogonal_to_u": (med_orth / med_u) if med_orth and med_u else None,
        "margin_along_u_flipped_fraction": base.fraction(along["converged"]),
    }


def _mirrors(profiles: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The mirror check: each flip-trained member against each plain one on the same data."""
    mirrors = {}
    for name, entry in profiles.items():
        if not base.is_flip(entry["augment"]):
            continue
        for other_name, other in profiles.items():
            if other["augment"] is None and other["dataset"] == entry["dataset"]:
                a = _finite_profile(other["median"])
                b = _finite_profile(entry["median"])[::-1]
                mirrors[f"{other_name} vs reversed {name}"] = spearman(a, b)
    return mirrors


def _finite_profile(values: list[float | None]) -> np.ndarray:
    """None (no flip: larger than anything measured) ranks above every finite value."""
    finite = [v for v in values if v is not None]
    top = (max(finite) if finite else 0.0) * 2 + 1
    return np.array([top if v is None else v for v in values])


# ------------------------------------------------------------------ figures


def _curve(values: list[float | None], cap: float) -> np.ndarray:
    return np.array([cap if v is None else v for v in values], float)


def plot_margin_profiles(profiles: dict[str, dict[str, Any]]):
    """Median margin per DCT block (low to high frequency), quartiles shaded; one line per model."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    finite = [v for p in profiles.values() for v in p["q75"] + p["median"] if v is not None]
    cap = 1.1 * max(finite) if finite else 1.0
    for key, p in profiles.items():
        idx = np.arange(len(p["median"]))
        (line,) = ax.plot(idx, _curve(p["median"], cap), marker="o", ms=3, label=key)
        ax.fill_between(
            idx, _curve(p["q25"], cap), _curve(p["q75"], cap), color=line.get_color(), alpha=0.18
        )
    first = next(iter(profiles.values()))
    starts = first["block_starts"]
    step = max(1, len(starts) // 8)
    ax.set_xticks(range(0, len(starts), step), [str(s) for s in starts[::step]])
    k = first["block"]
    ax.set_xlabel(f"diagonal DCT block ({k}x{k}) offset: low -> high frequency")
    ax.set_ylabel("margin along the block (L2)")
    ax.set_title("Margins along frequency subspaces (median, quartiles shaded)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_synthetic_profiles(profiles: dict[str, dict[str, Any]], synthetic: dict[str, Any]):
    """Synthetic data: margin along the discriminative direction u vs along DCT blocks."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(profiles), figsize=(6.5 * len(profiles), 4), squeeze=False)
    for ax, (key, p) in zip(axes[0], profiles.items(), strict=True):
        s = synthetic[key]
        med_u = s["median_margin_along_u"]  # None: most searches along u did not flip
        finite = [v for v in p["q75"] + p["median"] if v is not None]
        cap = 1.1 * max(finite + ([med_u] if med_u is not None else [])) if finite else 1.0
        idx = np.arange(len(p["median"]))
        orth = np.zeros(len(idx), bool)
        orth[s["orthogonal_blocks"]] = True
        ax.bar(
            idx[orth],
            _curve(p["median"], cap)[orth],
            color="tab:blue",
            label="blocks orthogonal to u",
        )
        if (~orth).any():
            ax.bar(
                idx[~orth],
                _curve(p["median"], cap)[~orth],
                color="tab:orange",
                label="blocks containing u",
            )
        if med_u is not None:
            ax.axhline(med_u, color="k", lw=1.5, label=f"along u: {med_u:.3f}")
        ax.axhline(s["eps"], color="k", ls=":", lw=1, label=f"construction eps = {s['eps']:g}")
        ax.set_xlabel("diagonal DCT block: low -> high frequency")
        ax.set_ylabel("median margin (L2)")
        ax.set_title(f"{key}: invariance off the discriminative direction")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_model_inputs(samples: dict[str, np.ndarray]):
    """The first test image of each model as that model sees it (flipped, low-passed, ...)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(1.8 * len(samples), 2.2), squeeze=False)
    for ax, (key, x) in zip(axes[0], samples.items(), strict=True):
        img = x[..., 0] if x.shape[-1] == 1 else np.clip(x, 0, 1)
        ax.imshow(img, cmap="gray" if x.shape[-1] == 1 else None)
        ax.set_title(key, fontsize=8)
        ax.axis("off")
    fig.suptitle("inputs as each model sees them", fontsize=9)
    fig.tight_layout()
    return fig
