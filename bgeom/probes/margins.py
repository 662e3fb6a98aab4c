"""Suite probe "margins": DeepFool margins of test images, per model and class."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bgeom.margins import deepfool
from bgeom.suite import ProbeOutput, SuiteContext, register_probe


@register_probe(
    "margins", samples=500, candidates=10, overshoot=0.02, max_iter=50, batch_size=128, examples=6
)
def margins_probe(ctx: SuiteContext, spec: dict[str, Any]) -> ProbeOutput:
    """DeepFool margins (minimal L2 perturbations) on test images, per model and class."""
    from bgeom import report

    summary: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    notes: list[str] = []
    pooled: dict[str, np.ndarray] = {}
    per_class: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    for key in spec["models"]:
        data = ctx.model_dataset(key)
        x, y = ctx.test_inputs(key, spec["samples"])
        n = len(x)
        member_results = []
        for i, (apply_fn, params) in enumerate(ctx.members(key)):

            def one(p, xi, apply_fn=apply_fn):
                return deepfool(
                    apply_fn,
                    p,
                    xi,
                    candidates=spec["candidates"],
                    overshoot=spec["overshoot"],
                    max_iter=spec["max_iter"],
                )

            member_results.append(
                ctx.map(
                    one,
                    params,
                    x,
                    in_axes=(None, 0),
                    batch_size=spec["batch_size"],
                    desc=f"deepfool {key}[{i}]",
                )
            )
        # Stack members: arrays are (members, n, ...).
        res = jax.tree.map(lambda *a: np.stack(a), *member_results)
        margin = res.margin
        converged = res.converged
        for field in ("margin", "converged", "label", "adv_label", "iterations"):
            arrays[f"{key}/{field}"] = np.asarray(getattr(res, field))
        arrays[f"{key}/true_label"] = y
        ok = margin[converged]
        # margin / ||x||, the scale-free robustness of Fawzi et al.
        relative = margin / np.linalg.norm(x.reshape(n, -1), axis=1)[None]
        correct = res.label == y[None]
        summary[key] = {
            "samples": int(n),
            "members": int(margin.shape[0]),
            "flipped_fraction": float(np.mean(converged)),
            "not_flipped": int(np.sum(~converged)),
            "median_margin": float(np.median(ok)) if ok.size else None,
            "mean_margin": float(np.mean(ok)) if ok.size else None,
            "quartiles": np.quantile(ok, [0.25, 0.75]).tolist() if ok.size else None,
            "median_margin_correct_only": float(np.median(margin[converged & correct]))
            if np.any(converged & correct)
            else None,
            "median_margin_per_member": [
                float(np.median(m[c])) if np.any(c) else None
                for m, c in zip(margin, converged, strict=True)
            ],
            "median_iterations": float(np.median(res.iterations)),
            "max_iterations": int(np.max(res.iterations)),
            "median_margin_per_class": {
                int(c): float(np.median(margin[converged & (res.label == c)]))
                for c in range(data.num_classes)
                if np.any(converged & (res.label == c))
            },
            "median_relative_margin": float(np.median(relative[converged])) if ok.size else None,
        }
        if np.any(~converged):
            notes.append(
                f"{key}: {int(np.sum(~converged))} of {converged.size} samples did not flip "
                f"within max_iter={spec['max_iter']}; they are left out of every margin statistic."
            )
        pooled[key] = ok
        per_class[key] = (margin[converged], res.label[converged])
        k = min(int(spec["examples"]), n)
        pick = np.flatnonzero(converged[0])[:k]
        examples[key] = {
            "x": x[pick],
            "perturbation": res.perturbation[0][pick],
            "label": res.label[0][pick],
            "adv_label": res.adv_label[0][pick],
            "margin": margin[0][pick],
        }
    figures = {
        "distribution": report.plot_margin_distribution(pooled),
        "per_class": report.plot_margin_per_class(
            per_class, ctx.model_dataset(spec["models"][0]).num_classes
        ),
    }
    for key, ex in examples.items():
        if len(ex["x"]):
            figures[f"examples-{key}"] = report.plot_perturbations(ex, title=key)
    return ProbeOutput(summary=summary, arrays=arrays, figures=figures, notes=notes)
