"""Suite probe "curvature": boundary curvature spectra, shared curved directions, detection.

For each model (member 0 of an ensemble):

1. the principal curvatures at the boundary points of ``samples`` test images
   and ``held_out`` training images (``bgeom.boundary_curvature``): the whole
   spectrum (all d - 1 curvatures, Lanczos to full depth) when d - 1 <=
   ``full_spectrum_max_dim``, else the ``k`` largest and smallest and the
   density by stochastic Lanczos quadrature (``curvature_density``);
2. the shared curved subspace S (``shared_curved_subspace_at``, the held-out
   points), ``||P_S r|| / ||r||`` of the test perturbations against
   ``sqrt(m / d)`` and a random subspace, and DeepFool restricted to S and to a
   random subspace of the same dimension against unrestricted DeepFool;
3. detection by curvature asymmetry (``bgeom.detection``): a threshold at the
   ``false_positive_rate`` of held-out clean scores, ROC AUC of clean test
   images against DeepFool-perturbed ones (perturbation scaled by each of
   ``scales``), and label recovery.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bgeom import curvature, detection, subspaces
from bgeom.margins import deepfool, subspace_deepfool
from bgeom.suite import ProbeOutput, SuiteContext, register_probe


@register_probe(
    "curvature",
    samples=48,
    held_out=48,
    k=10,
    full_spectrum_max_dim=128,
    operator="auto",
    fd_scale=curvature.DEFAULT_FD_SCALE,
    subspace_dim=8,
    slq_probes=4,
    slq_matvecs=30,
    directions=32,
    radius_factor=1.0,
    false_positive_rate=0.05,
    scales=[1.0, 2.0, 5.0],
    batch_size=48,
    seed=0,
)
def curvature_probe(ctx: SuiteContext, spec: dict[str, Any]) -> ProbeOutput:
    """Curvature of the decision boundary: spectra, shared curved subspace, detection."""
    summary: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    notes: list[str] = []
    plots: dict[str, dict[str, Any]] = {}
    for key in spec["models"]:
        data = ctx.model_dataset(key)
        apply_fn, params = ctx.members(key)[0]
        if len(ctx.members(key)) > 1:
            notes.append(f"{key}: an ensemble; the curvature probe analyses member 0 only.")
        out, plot = _analyse_model(ctx, spec, key, data, apply_fn, params, notes)
        summary[key] = out["summary"]
        arrays.update({f"{key}/{name}": value for name, value in out["arrays"].items()})
        plots[key] = plot
    figures = {
        "spectrum": plot_spectra(plots),
        "detection": plot_roc(plots),
    }
    for key, plot in plots.items():
        figures[f"directions-{key}"] = plot_directions(plot, title=key)
    notes.append(
        "Curvatures are those of F = f_label - f_adv at the refined DeepFool boundary point, "
        "sign: positive bends towards the adverse class. ReLU networks use finite-difference "
        "HVPs (operator 'fd', h = fd_scale x distance to the boundary); that map is not exactly "
        "linear on a piecewise-linear net, so its Lanczos residuals are large (see "
        "median_relative_residual) and its spectrum depends on h: read it as the bending at "
        "scale h, not as an exact Hessian spectrum."
    )
    return ProbeOutput(summary=summary, arrays=arrays, figures=figures, notes=notes)


def _analyse_model(ctx, spec, key, data, apply_fn, params, notes):
    n = min(int(spec["samples"]), len(data.x_test))
    n_held = min(int(spec["held_out"]), len(data.x_train))
    x_test, y_test = np.asarray(data.x_test[:n]), np.asarray(data.y_test[:n])
    x_held = np.asarray(data.x_train[:n_held])
    shape = x_test.shape[1:]
    d = int(np.prod(shape))
    full = d - 1 <= int(spec["full_spectrum_max_dim"])
    k = d - 1 if full else min(int(spec["k"]), d - 1)
    which = "largest" if full else "both"
    num_matvecs = d - 1 if full else None
    operator, fd_scale = spec["operator"], float(spec["fd_scale"])
    bs = int(spec["batch_size"])

    def bc(p, xi):
        return curvature.boundary_curvature(
            apply_fn,
            p,
            xi,
            k=k,
            which=which,
            num_matvecs=num_matvecs,
            operator=operator,
            fd_scale=fd_scale,
        )

    # Test and held-out points in one call: one compiled function for both.
    both = ctx.map(
        bc,
        params,
        np.concatenate([x_test, x_held]),
        in_axes=(None, 0),
        batch_size=bs,
        desc=f"curvature {key}",
    )
    test = jax.tree.map(lambda a: a[:n], both)
    held = jax.tree.map(lambda a: a[n:], both)
    op_name = curvature.OPERATORS[int(test.operator[0])]
    ok = np.asarray(test.converged, bool)
    kappa = np.asarray(test.curvatures, np.float64)
    resid = np.asarray(test.residuals, np.float64)
    scale = np.max(np.abs(kappa), axis=1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    rel_resid = np.max(resid / scale, axis=1)
    distance = np.linalg.norm((np.asarray(test.boundary_point) - x_test).reshape(n, -1), axis=1)
    if not ok.all():
        notes.append(f"{key}: {int((~ok).sum())} of {n} test points did not converge; left out.")
    kappa_ok, norm_ok = kappa[ok], (kappa / scale)[ok]

    # Density of the normalised curvatures kappa / max |kappa|.
    grid = np.linspace(-1.1, 1.1, 221)
    width = 0.03
    if full:
        flat = np.mean(np.abs(norm_ok) <= 0.1, axis=1)
        # Every curvature is a node of weight 1 / (d - 1): the exact spectral measure.
        weights = np.full(norm_ok.shape, 1.0 / (d - 1))
        density = np.asarray(curvature.spectral_density(norm_ok, weights, grid, width))
        density_method = f"exact: all d - 1 = {d - 1} curvatures (Lanczos to full depth)"
    else:
        keys = jax.random.split(jax.random.PRNGKey(int(spec["seed"])), n)

        def dens(p, xi, ki):
            return curvature.curvature_density(
                apply_fn,
                p,
                xi,
                ki,
                num_probes=int(spec["slq_probes"]),
                num_matvecs=min(int(spec["slq_matvecs"]), d - 1),
                operator=operator,
                fd_scale=fd_scale,
            )

        slq = ctx.map(
            dens, params, x_test, keys, in_axes=(None, 0, 0), batch_size=bs, desc=f"SLQ {key}"
        )
        nodes = np.asarray(slq.nodes, np.float64) / scale[:, :, None]
        weights = np.asarray(slq.weights, np.float64)
        nodes_ok, weights_ok = nodes[ok], weights[ok]
        flat = np.sum(weights_ok * (np.abs(nodes_ok) <= 0.1), axis=2).mean(axis=1)
        density = np.asarray(curvature.spectral_density(nodes_ok, weights_ok, grid, width))
        density_method = (
            f"stochastic Lanczos quadrature ({spec['slq_probes']} probes x "
            f"{min(int(spec['slq_matvecs']), d - 1)} steps per point); kappa normalised by the "
            f"extreme of the top/bottom {k} Lanczos curvatures"
        )

    # Shared curved subspace from the held-out points.
    m = min(int(spec["subspace_dim"]), d - 1)
    shared = curvature.shared_curved_subspace_at(
        apply_fn, params, held, m=m, key=jax.random.PRNGKey(int(spec["seed"]))
    )
    basis = np.asarray(shared.basis)
    random_sub = subspaces.random(jax.random.PRNGKey(int(spec["seed"]) + 1), shape, m)
    curved_sub = subspaces.from_basis(basis, name="shared curved")
    r = np.asarray(test.boundary_point) - x_test
    ratio = _projection_ratios(r, basis)
    ratio_random = _projection_ratios(r, np.asarray(random_sub.basis))

    def margins(p, xi):
        return (
            deepfool(apply_fn, p, xi),
            subspace_deepfool(apply_fn, p, xi, curved_sub),
            subspace_deepfool(apply_fn, p, xi, random_sub),
        )

    full_df, in_s, in_r = ctx.map(
        margins, params, x_test, in_axes=(None, 0), batch_size=bs, desc=f"margins in S {key}"
    )

    # Detection: directions in S, threshold on held-out clean scores.
    held_distance = np.linalg.norm(
        (np.asarray(held.boundary_point) - x_held).reshape(n_held, -1), axis=1
    )
    held_ok = np.asarray(held.converged, bool)
    radius = float(spec["radius_factor"]) * float(
        np.median(held_distance[held_ok]) if held_ok.any() else 1.0
    )
    dirs = detection.curved_directions(
        jax.random.PRNGKey(int(spec["seed"]) + 2), basis, int(spec["directions"]), radius
    )
    scales = [float(s) for s in spec["scales"]]
    pert = np.asarray(full_df.perturbation)
    df_ok = np.asarray(full_df.converged, bool)
    inputs = [x_held, x_test] + [x_test + s * pert for s in scales]
    scored = ctx.map(
        lambda p, xi: detection.asymmetry_score(apply_fn, p, xi, dirs),
        params,
        np.concatenate(inputs).astype(x_test.dtype),
        in_axes=(None, 0),
        batch_size=bs,
        desc=f"asymmetry {key}",
    )
    s_all = np.asarray(scored.score, np.float64)
    held_scores, clean_scores = s_all[:n_held], s_all[n_held : n_held + n]
    threshold = detection.fit_threshold(held_scores, float(spec["false_positive_rate"]))
    det: dict[str, Any] = {}
    rocs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    clean_label = np.asarray(full_df.label)
    for i, s in enumerate(scales):
        sl = slice(n_held + (i + 1) * n, n_held + (i + 2) * n)
        ps = s_all[sl][df_ok]
        rec = np.asarray(scored.recovered_label)[sl][df_ok]
        flagged = ps > threshold
        fpr, tpr, auc = detection.roc(clean_scores, ps)
        rocs[f"x{s:g}"] = (fpr, tpr)
        det[f"x{s:g}"] = {
            "auc": auc,
            "detection_rate": float(np.mean(flagged)) if ps.size else None,
            "recovery_accuracy_flagged": detection.recovery_accuracy(
                rec, clean_label[df_ok], flagged
            ),
            "recovery_accuracy_all": detection.recovery_accuracy(rec, clean_label[df_ok]),
            "recovery_accuracy_vs_ground_truth": detection.recovery_accuracy(rec, y_test[df_ok]),
        }
    clean_fpr = float(np.mean(clean_scores > threshold))
    # JSON has no NaN: "no flagged input" is recorded as None.
    det = {
        name: {m: (None if v is not None and not np.isfinite(v) else v) for m, v in row.items()}
        for name, row in det.items()
    }

    def stat(a):
        a = np.asarray(a, np.float64)
        a = a[np.isfinite(a)]
        return float(np.median(a)) if a.size else None

    margin_full = np.asarray(full_df.margin)
    margin_s, margin_r = np.asarray(in_s.margin), np.asarray(in_r.margin)
    mean_spectrum = kappa_ok.mean(0) if len(kappa_ok) else np.full(k, np.nan)
    summary = {
        "samples": n,
        "held_out": n_held,
        "dimension": d,
        "operator": op_name,
        "median_fd_scale": stat(test.scale) if op_name == "fd" else None,
        "converged_fraction": float(ok.mean()),
        "median_distance_to_boundary": stat(distance[ok]),
        "spectrum": "full" if full else f"top/bottom {k}",
        "median_max_abs_curvature": stat(scale[ok, 0]),
        "median_relative_residual": stat(rel_resid[ok]),
        "max_relative_residual": float(np.max(rel_resid[ok])) if ok.any() else None,
        "flat_fraction_median": stat(flat),
        "flat_fraction_quartiles": np.quantile(flat, [0.25, 0.75]).tolist() if flat.size else None,
        "density_method": density_method,
        "mean_sorted_curvatures": mean_spectrum.tolist(),
        "curvature_quantiles_10_90": (
            np.quantile(kappa_ok, [0.1, 0.9], axis=0).tolist() if len(kappa_ok) else None
        ),
        "density_grid": grid.tolist(),
        "density": np.asarray(density).tolist(),
        "subspace_dim": m,
        "subspace_curvatures": np.asarray(shared.curvatures).tolist(),
        "subspace_relative_residual": float(
            np.max(np.asarray(shared.residuals)) / max(np.max(np.abs(shared.curvatures)), 1e-30)
        ),
        "projection_ratio_median": stat(ratio[ok]),
        "projection_ratio_random_subspace_median": stat(ratio_random[ok]),
        "projection_ratio_baseline_sqrt_m_over_d": curvature.random_baseline(m, d),
        "deepfool_margin_median": stat(margin_full),
        "margin_in_S_median": stat(margin_s),
        "margin_in_random_subspace_median": stat(margin_r),
        "flipped_in_S": float(np.mean(np.asarray(in_s.converged))),
        "flipped_in_random_subspace": float(np.mean(np.asarray(in_r.converged))),
        "detection_radius": radius,
        "detection_directions": int(spec["directions"]),
        "detection_threshold": threshold,
        "clean_test_false_positive_rate": clean_fpr,
        "detection": det,
        "auc_x1": det[f"x{scales[0]:g}"]["auc"],
        "recovery_x1": det[f"x{scales[0]:g}"]["recovery_accuracy_flagged"],
        "roc": {name: {"fpr": f.tolist(), "tpr": t.tolist()} for name, (f, t) in rocs.items()},
    }
    arrays = {
        "curvatures": kappa.astype(np.float32),
        "residuals": resid.astype(np.float32),
        "converged": ok,
        "label": np.asarray(test.label),
        "adv_label": np.asarray(test.adv_label),
        "scale": np.asarray(test.scale),
        "distance": distance.astype(np.float32),
        "shared_basis": basis.astype(np.float32),
        "shared_curvatures": np.asarray(shared.curvatures),
        "projection_ratio": ratio.astype(np.float32),
        "projection_ratio_random": ratio_random.astype(np.float32),
        "margin": margin_full,
        "margin_in_S": margin_s,
        "margin_in_random": margin_r,
        "scores": s_all.astype(np.float32),
        "recovered_label": np.asarray(scored.recovered_label),
    }
    plot = {
        "mean": mean_spectrum,
        "q": np.quantile(kappa_ok, [0.1, 0.9], axis=0) if len(kappa_ok) else None,
        "grid": grid,
        "density": np.asarray(density),
        "basis": basis,
        "basis_curvatures": np.asarray(shared.curvatures),
        "rocs": rocs,
        "aucs": {name: v["auc"] for name, v in det.items()},
        "operator": op_name,
    }
    return {"summary": summary, "arrays": arrays}, plot


def _projection_ratios(r: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``||P_S r_i|| / ||r_i||`` for a batch of perturbations (NumPy, orthonormal basis)."""
    flat_r = r.reshape(len(r), -1)
    coeffs = flat_r @ basis.reshape(len(basis), -1).T
    norm = np.linalg.norm(flat_r, axis=1)
    return np.linalg.norm(coeffs, axis=1) / np.where(norm > 0, norm, 1.0)


# ------------------------------------------------------------------ plots


def plot_spectra(plots: dict[str, dict[str, Any]]):
    """Sorted principal curvatures (mean, 10-90 % band) and the density of kappa / max|kappa|."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for (name, p), color in zip(plots.items(), plt.cm.tab10.colors, strict=False):
        mean = np.asarray(p["mean"])
        idx = np.arange(1, len(mean) + 1)
        label = f"{name} ({p['operator']})"
        ax1.plot(idx, mean, color=color, label=label)
        if p["q"] is not None:
            ax1.fill_between(idx, p["q"][0], p["q"][1], color=color, alpha=0.2)
        ax2.plot(p["grid"], p["density"], color=color, label=label)
    ax1.axhline(0, color="k", lw=0.5)
    ax1.set_xlabel("index (sorted descending)")
    ax1.set_ylabel("principal curvature")
    ax1.set_title("Principal curvatures (mean, 10-90 % band)")
    ax1.legend(fontsize=8)
    ax2.axvspan(-0.1, 0.1, color="0.9")
    ax2.set_xlabel("kappa / max |kappa| (shaded: |.| <= 0.1, 'flat')")
    ax2.set_ylabel("density")
    ax2.set_title("Density of normalised curvatures")
    fig.tight_layout()
    return fig


def plot_directions(plot: dict[str, Any], title: str = "", num: int = 8):
    """The top shared curved directions as images, with their average curvatures."""
    import matplotlib.pyplot as plt

    # Most curved first, whichever the sign.
    order = np.argsort(-np.abs(np.asarray(plot["basis_curvatures"])))[:num]
    basis = np.asarray(plot["basis"])[order]
    vals = np.asarray(plot["basis_curvatures"])[order]
    fig, axes = plt.subplots(1, len(basis), figsize=(1.4 * len(basis) + 0.4, 1.9), squeeze=False)
    for ax, v, kappa in zip(axes[0], basis, vals, strict=True):
        img = v.mean(-1) if v.shape[-1] > 1 else v[..., 0]
        lim = float(np.max(np.abs(img))) or 1.0
        ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{kappa:.3g}", fontsize=8)
    fig.suptitle(f"Shared curved directions: {title}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_roc(plots: dict[str, dict[str, Any]]):
    """ROC curves of the curvature-asymmetry detector, one panel per model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plots), figsize=(3.4 * len(plots), 3.2), squeeze=False)
    for ax, (name, p) in zip(axes[0], plots.items(), strict=True):
        for (scale, (fpr, tpr)), color in zip(p["rocs"].items(), plt.cm.tab10.colors, strict=False):
            ax.plot(fpr, tpr, color=color, label=f"r {scale}: AUC {p['aucs'][scale]:.2f}")
        ax.plot([0, 1], [0, 1], color="k", lw=0.5, ls="--")
        ax.set_xlabel("false positive rate (clean)")
        ax.set_ylabel("true positive rate (perturbed)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Detection by curvature asymmetry", fontsize=10)
    fig.tight_layout()
    return fig
