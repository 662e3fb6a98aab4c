"""Suite probe "invariance": margins along DCT subspaces, low to high frequency.

The experiment of "Hold me tight!" (Ortiz-Jimenez et al., NeurIPS 2020,
https://arxiv.org/abs/2002.06349): for every model, the margin of test images
along each diagonal K x K DCT block. Networks have small margins along the
directions the data discriminates along and very large ones (invariance) along
the rest. Models trained on frequency-flipped data (``augment = "flip"``) are
probed on flipped images and should show the mirrored profile; low-pass
training (``augment = {name = "low_pass", ...}``) and L2 adversarial training
(``augment = {name = "pgd", eps = 2.0}``) move the curve as the paper reports.
On synthetic data (``bgeom.data.synthetic``) the probe also measures the margin
along the one discriminative direction u, which should be about the
construction's eps, against the margins along the DCT blocks orthogonal to u.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bgeom import subspaces as subspaces_lib
from bgeom.margins import subspace_deepfool
from bgeom.suite import ProbeOutput, SuiteContext, register_probe


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two profiles (average ranks for ties; NaN if constant)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _stats(margin: np.ndarray) -> dict[str, Any]:
    """Median and quartiles per subspace over samples (and members); inf = no flip."""
    flat = margin.reshape(-1, margin.shape[-1])
    q = np.quantile(flat, [0.25, 0.5, 0.75], axis=0)
    finite = lambda a: [float(v) if np.isfinite(v) else None for v in a]
    return {
        "median": finite(q[1]),
        "q25": finite(q[0]),
        "q75": finite(q[2]),
        "flipped_fraction": np.isfinite(flat).mean(0).tolist(),
    }


def _margins(ctx: SuiteContext, key: str, x: np.ndarray, subspace, spec: dict[str, Any], desc):
    """Subspace margins of every member of ``key``: arrays (members, n, M)."""
    out = []
    for i, (apply_fn, params) in enumerate(ctx.members(key)):

        def one(p, stack, xi, apply_fn=apply_fn):
            import jax

            return jax.vmap(
                lambda s: subspace_deepfool(
                    apply_fn,
                    p,
                    xi,
                    s,
                    candidates=spec["candidates"],
                    overshoot=spec["overshoot"],
                    max_iter=spec["max_iter"],
                )
            )(stack)

        res = ctx.map(
            one,
            params,
            subspace,
            x,
            in_axes=(None, None, 0),
            batch_size=spec["batch_size"],
            desc=f"{desc} {key}[{i}]",
        )
        out.append(res)
    return {f: np.stack([np.asarray(getattr(r, f)) for r in out]) for f in out[0]._fields}


@register_probe(
    "invariance",
    samples=100,
    block=8,
    stride=1,
    candidates=10,
    overshoot=0.02,
    max_iter=100,
    batch_size=50,
)
def invariance_probe(ctx: SuiteContext, spec: dict[str, Any]) -> ProbeOutput:
    """Margins along DCT frequency blocks, low to high, per model ("Hold me tight!")."""
    summary: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    notes: list[str] = []
    profiles: dict[str, dict[str, Any]] = {}
    synthetic: dict[str, dict[str, Any]] = {}
    samples: dict[str, np.ndarray] = {}
    for key in spec["models"]:
        data = ctx.model_dataset(key)
        x, _ = ctx.test_inputs(key, spec["samples"])
        shape = x.shape[1:]
        blocks = subspaces_lib.dct_blocks(shape, spec["block"], spec["stride"])
        starts = subspaces_lib.block_starts(shape, spec["block"], spec["stride"])
        res = _margins(ctx, key, x, blocks, spec, "subspace margins")
        margin = res["margin"]  # (members, n, blocks)
        for field in ("margin", "converged", "iterations", "label", "adv_label"):
            arrays[f"{key}/{field}"] = res[field]
        arrays[f"{key}/block_starts"] = starts
        augment = ctx.config["models"][key].get("augment")
        entry = {
            "dataset": ctx.config["models"][key]["dataset"],
            "augment": augment,
            "samples": int(len(x)),
            "block": int(spec["block"]),
            "stride": int(spec["stride"]),
            "block_starts": starts.tolist(),
            "test_accuracy": np.atleast_1d(ctx.model(key).test_accuracy).tolist(),
            **_stats(margin),
            "median_iterations": float(np.median(res["iterations"])),
        }
        not_flipped = int(np.sum(~res["converged"]))
        if not_flipped:
            notes.append(
                f"{key}: {not_flipped} of {res['converged'].size} (sample, block) searches did not "
                f"flip the label within max_iter={spec['max_iter']}; their margin counts as "
                "infinite (larger than any finite one) in the medians and quartiles."
            )
        direction = data.info.get("direction") if data.name == "synthetic" else None
        if direction is not None:
            u = subspaces_lib.from_basis(np.asarray(direction, np.float32)[None], name="u")
            along = _margins(ctx, key, x, subspaces_lib.stack([u]), spec, "margin along u")
            margin_u = along["margin"][..., 0]
            arrays[f"{key}/margin_along_u"] = margin_u
            # Blocks orthogonal to u: those that do not contain u's DCT support.
            support = np.abs(np.asarray(subspaces_lib.dct2(np.asarray(direction))))[..., 0] > 1e-6
            orth = np.array([not np.any(support & (np.asarray(m) > 0)) for m in blocks.mask])
            med_u = float(np.median(margin_u))
            med_orth = float(np.median(margin[..., orth])) if orth.any() else None
            synthetic[key] = {
                "eps": float(data.info["eps"]),
                "median_margin_along_u": med_u,
                "relative_error_vs_eps": abs(med_u - data.info["eps"]) / data.info["eps"],
                "orthogonal_blocks": np.flatnonzero(orth).tolist(),
                "median_margin_orthogonal_blocks": med_orth,
                "ratio_orthogonal_to_u": (med_orth / med_u) if med_orth and med_u > 0 else None,
                "margin_along_u_flipped_fraction": float(np.mean(along["converged"])),
            }
            entry["synthetic"] = synthetic[key]
        summary[key] = entry
        profiles[key] = entry
        samples[key] = x[0]

    # The mirror check: a flip-trained model against a plain one on the same data.
    mirrors = {}
    for key, entry in profiles.items():
        if not _is_flip(entry["augment"]):
            continue
        for base, other in profiles.items():
            if other["augment"] is None and other["dataset"] == entry["dataset"]:
                a = _finite_profile(other["median"])
                b = _finite_profile(entry["median"])[::-1]
                mirrors[f"{base} vs reversed {key}"] = spearman(a, b)
    if mirrors:
        summary["mirror_spearman"] = mirrors

    figures = {}
    natural = {k: v for k, v in profiles.items() if k not in synthetic}
    if natural:
        figures["profile"] = plot_margin_profiles(natural)
    if synthetic:
        figures["synthetic"] = plot_synthetic_profiles(
            {k: profiles[k] for k in synthetic}, synthetic
        )
    figures["inputs"] = plot_model_inputs(samples)
    return ProbeOutput(summary=summary, arrays=arrays, figures=figures, notes=notes)


def _is_flip(augment: Any) -> bool:
    return augment == "flip" or (isinstance(augment, dict) and augment.get("name") == "flip")


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
        finite = [v for v in p["q75"] + p["median"] if v is not None]
        cap = 1.1 * max(finite + [s["median_margin_along_u"]]) if finite else 1.0
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
        ax.axhline(
            s["median_margin_along_u"],
            color="k",
            lw=1.5,
            label=f"along u: {s['median_margin_along_u']:.3f}",
        )
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
