"""Suite probe "margins": DeepFool margins of test images, per model member and class.

Method: docs/margins.md. Arrays are saved per member as ``<name>/<field>`` with
a leading axis of length 1 (the member), shape (1, samples).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bgeom.margins import deepfool
from bgeom.probes import base
from bgeom.probes.base import Member, ProbeOptions, ProbeOutput, SuiteContext, option


@dataclasses.dataclass(frozen=True)
class MarginsOptions(ProbeOptions):
    """Options of the margins probe (docs/margins.md)."""

    samples: int = option(500, "test images per model (the first ones of the test split)", ge=1)
    candidates: int = option(10, "DeepFool candidate classes (top classes of the logits)", ge=2)
    overshoot: float = option(0.02, "DeepFool overshoot", ge=0)
    max_iter: int = option(
        50, "most DeepFool steps (a search that does not flip is left out)", ge=0
    )
    batch_size: int = option(128, "examples in flight at once (slots of the batched driver)", ge=1)
    examples: int = option(6, "perturbations drawn per member in the examples figure", ge=0)


@base.register_probe("margins", MarginsOptions)
def margins_probe(
    ctx: SuiteContext, opts: MarginsOptions, *, probe_id: str, models: tuple[str, ...]
) -> ProbeOutput:
    """DeepFool margins (minimal L2 perturbations) on test images, per model and class."""
    from bgeom import report

    out = ProbeOutput(summary={})
    pooled: dict[str, np.ndarray] = {}
    per_class: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    for member in ctx.all_members(models):
        x, y = ctx.test_inputs(member.model, opts.samples)
        res = _deepfool(ctx, member, x, opts)
        name = member.name
        for field in ("margin", "converged", "label", "adv_label", "iterations"):
            out.arrays[f"{name}/{field}"] = res[field]
        out.arrays[f"{name}/true_label"] = y
        num_classes = ctx.model_dataset(member.model).num_classes
        out.summary[name] = _summary(res, x, y, num_classes)
        converged = res["converged"]
        if np.any(~converged):
            out.notes.append(
                f"{name}: {int(np.sum(~converged))} of {converged.size} samples did not flip "
                f"within max_iter={opts.max_iter}; they are left out of every margin statistic."
            )
        pooled[name] = res["margin"][converged]
        per_class[name] = (res["margin"][converged], res["label"][converged])
        pick = np.flatnonzero(converged[0])[: min(opts.examples, len(x))]
        examples[name] = {
            "x": x[pick],
            "perturbation": res["perturbation"][0][pick],
            "label": res["label"][0][pick],
            "adv_label": res["adv_label"][0][pick],
            "margin": res["margin"][0][pick],
        }
    out.figures = {
        "distribution": report.plot_margin_distribution(pooled),
        "per_class": report.plot_margin_per_class(
            per_class, ctx.model_dataset(models[0]).num_classes
        ),
    }
    for name, ex in examples.items():
        if len(ex["x"]):
            out.figures[f"examples-{name}"] = report.plot_perturbations(ex, title=name)
    return out


def _deepfool(
    ctx: SuiteContext, member: Member, x: np.ndarray, opts: MarginsOptions
) -> dict[str, np.ndarray]:
    """DeepFool on every image of ``x``: each field with a leading member axis (1, n, ...)."""
    res = ctx.batched(
        deepfool,
        member,
        x,
        batch_size=opts.batch_size,
        desc=f"deepfool {member.name}",
        candidates=opts.candidates,
        overshoot=opts.overshoot,
        max_iter=opts.max_iter,
    )
    return {f: np.asarray(getattr(res, f))[None] for f in res._fields}


def _summary(
    res: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, num_classes: int
) -> dict[str, Any]:
    margin, converged, label = res["margin"], res["converged"], res["label"]
    n = len(x)
    ok = margin[converged]
    # margin / ||x||, the scale-free robustness of Fawzi et al.
    relative = margin / np.linalg.norm(x.reshape(n, -1), axis=1)[None]
    correct = label == y[None]
    return {
        "samples": int(n),
        "members": int(margin.shape[0]),
        "flipped_fraction": base.fraction(converged),
        "not_flipped": int(np.sum(~converged)),
        "median_margin": base.median(ok),
        "mean_margin": base.mean(ok),
        "quartiles": base.quantiles(ok, [0.25, 0.75]),
        "median_margin_correct_only": base.median(margin[converged & correct]),
        "median_margin_per_member": [
            base.median(m[c]) for m, c in zip(margin, converged, strict=True)
        ],
        "median_iterations": base.median(res["iterations"]),
        "max_iterations": int(np.max(res["iterations"])),
        "median_margin_per_class": {
            int(c): base.median(margin[converged & (label == c)])
            for c in range(num_classes)
            if np.any(converged & (label == c))
        },
        "median_relative_margin": base.median(relative[converged]),
    }
