"""Suite probe "curvature": boundary curvature spectra, shared curved directions, detection.

Method: docs/curvature.md and docs/detection.md. For every model member, on
test images and ``held_out`` training images as the model sees them (a
flip-trained model on flipped images):

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

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from bgeom import curvature, detection, subspaces
from bgeom.margins import deepfool, subspace_margins
from bgeom.probes import base
from bgeom.probes.base import Member, ProbeOptions, ProbeOutput, SuiteContext, option


@dataclasses.dataclass(frozen=True)
class CurvatureOptions(ProbeOptions):
    """Options of the curvature probe (docs/curvature.md, docs/detection.md)."""

    samples: int = option(48, "test images per model member", ge=1)
    held_out: int = option(48, "training images for the shared subspace and threshold", ge=1)
    k: int = option(10, "largest and smallest curvatures kept when not the full spectrum", ge=1)
    full_spectrum_max_dim: int = option(
        128, "all d - 1 curvatures (exact density) when d - 1 is at most this", ge=0
    )
    operator: str = option(
        "auto",
        "Hessian-vector products: exact, fd (finite differences) or auto",
        choices=("auto", *curvature.OPERATORS),
    )
    fd_scale: float = option(
        curvature.DEFAULT_FD_SCALE,
        "finite-difference step h as a fraction of the distance to the boundary",
        gt=0,
    )
    subspace_dim: int = option(8, "dimension m of the shared curved subspace S", ge=1)
    slq_probes: int = option(4, "stochastic Lanczos quadrature probes per point", ge=1)
    slq_matvecs: int = option(30, "Lanczos steps per SLQ probe (capped at d - 1)", ge=1)
    directions: int = option(32, "random directions in S of the asymmetry score", ge=1)
    radius_factor: float = option(
        1.0, "detection radius as a multiple of the median held-out margin", gt=0
    )
    false_positive_rate: float = option(
        0.05, "false-positive rate of the threshold on held-out clean scores", ge=0, lt=1
    )
    scales: tuple[float, ...] = option(
        (1.0, 2.0, 5.0), "factors the DeepFool perturbations are scaled by for detection", ge=0
    )
    batch_size: int = option(48, "images per compiled batch", ge=1)
    seed: int = option(0, "seed of the SLQ probes, random subspace and directions")


class _Plan(NamedTuple):
    """The sizes of one member's analysis."""

    n: int  # test images
    n_held: int  # held-out images
    d: int  # input dimension
    full: bool  # the whole spectrum (else top/bottom k and SLQ)
    k: int
    which: str
    num_matvecs: int | None


class _Spectra(NamedTuple):
    test: Any  # CurvatureResult of the test points
    held: Any  # ... of the held-out points
    operator: str
    ok: np.ndarray  # converged test points
    kappa: np.ndarray  # (n, k) float64
    resid: np.ndarray
    scale: np.ndarray  # (n, 1) max |kappa| (1 where 0)
    rel_resid: np.ndarray
    distance: np.ndarray  # distance of the test points to their boundary points


class _Density(NamedTuple):
    grid: np.ndarray
    density: np.ndarray
    flat: np.ndarray  # fraction of |kappa| / max |kappa| <= 0.1 per converged point
    method: str


class _Shared(NamedTuple):
    m: int
    subspace: Any  # SharedSubspace
    basis: np.ndarray
    ratio: np.ndarray
    ratio_random: np.ndarray
    full_df: Any  # DeepFool, in S, in a random subspace (MarginResult each)
    in_s: Any
    in_r: Any


class _Detection(NamedTuple):
    radius: float
    threshold: float
    clean_fpr: float
    rows: dict[str, dict[str, Any]]  # per scale
    rocs: dict[str, tuple[np.ndarray, np.ndarray]]
    scores: np.ndarray
    recovered_label: np.ndarray


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, np.float64)


@base.register_probe("curvature", CurvatureOptions)
def curvature_probe(
    ctx: SuiteContext, opts: CurvatureOptions, *, probe_id: str, models: tuple[str, ...]
) -> ProbeOutput:
    """Curvature of the decision boundary: spectra, shared curved subspace, detection."""
    out = ProbeOutput(summary={})
    plots: dict[str, dict[str, Any]] = {}
    for member in ctx.all_members(models):
        summary, arrays, plots[member.name] = _analyse_member(ctx, opts, member, out.notes)
        out.summary[member.name] = summary
        out.arrays.update({f"{member.name}/{name}": value for name, value in arrays.items()})
    out.figures = {"spectrum": plot_spectra(plots), "detection": plot_roc(plots)}
    for name, plot in plots.items():
        out.figures[f"directions-{name}"] = plot_directions(plot, title=name)
    out.notes.append(
        "Curvatures are those of F = f_label - f_adv at the refined DeepFool boundary point, "
        "sign: positive bends towards the adverse class. ReLU networks use finite-difference "
        "HVPs (operator 'fd'): a ReLU net is piecewise linear, so the operator at scale h "
        "measures how much the gradient turns within +-h, and is exactly zero when no unit "
        "changes state there. h starts at fd_scale x the distance to the boundary and doubles "
        "(up to twice the distance) until the gradient turns along most probe directions; a "
        "point still flat at the largest scale has status flat_at_scale and is left out "
        "(median_fd_scale is the h used). The map is not exactly linear, so its Lanczos "
        "residuals are large (median_relative_residual) and its spectrum depends on h: read "
        "it as the bending at scale h, not as an exact Hessian spectrum."
    )
    return out


def _analyse_member(
    ctx: SuiteContext, opts: CurvatureOptions, member: Member, notes: list[str]
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """Summary, arrays and plot data of one member."""
    x_test, y_test = ctx.test_inputs(member.model, opts.samples)
    x_held, _ = ctx.train_inputs(member.model, opts.held_out)
    d = int(np.prod(x_test.shape[1:]))
    full = d - 1 <= opts.full_spectrum_max_dim
    plan = _Plan(
        n=len(x_test),
        n_held=len(x_held),
        d=d,
        full=full,
        k=d - 1 if full else min(opts.k, d - 1),
        which="largest" if full else "both",
        num_matvecs=d - 1 if full else None,
    )
    spectra = _spectra(ctx, opts, member, plan, x_test, x_held)
    if not spectra.ok.all():
        status = np.asarray(spectra.test.status)[~spectra.ok]
        reasons = {
            curvature.STATUS_NAMES[s]: int(c) for s, c in enumerate(np.bincount(status)) if c
        }
        notes.append(
            f"{member.name}: {int((~spectra.ok).sum())} of {plan.n} test points did not "
            f"converge ({reasons}); left out."
        )
    density = _density(ctx, opts, member, plan, x_test, spectra)
    shared = _shared_subspace(ctx, opts, member, plan, x_test, spectra)
    det = _detection(ctx, opts, member, plan, (x_test, y_test, x_held), spectra, shared)
    summary = {
        **_spectrum_summary(plan, spectra, density),
        **_subspace_summary(plan, spectra.ok, shared),
        **_detection_summary(opts, det),
    }
    return summary, _arrays(spectra, shared, det), _plot_data(plan, spectra, density, shared, det)


def _spectra(ctx, opts, member, plan, x_test, x_held) -> _Spectra:
    """Principal curvatures at the boundary points of the test and held-out images."""

    def bc(p, xi):
        return curvature.boundary_curvature(
            member.apply_fn,
            p,
            xi,
            k=plan.k,
            which=plan.which,
            num_matvecs=plan.num_matvecs,
            operator=opts.operator,
            fd_scale=opts.fd_scale,
        )

    # Test and held-out points in one call: one compiled function for both.
    both = ctx.map(
        bc,
        member.params,
        np.concatenate([x_test, x_held]),
        in_axes=(None, 0),
        batch_size=opts.batch_size,
        desc=f"curvature {member.name}",
    )
    n = plan.n
    test = jax.tree.map(lambda a: a[:n], both)
    kappa, resid = _f64(test.curvatures), _f64(test.residuals)
    scale = np.max(np.abs(kappa), axis=1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    distance = np.linalg.norm((np.asarray(test.boundary_point) - x_test).reshape(n, -1), axis=1)
    return _Spectra(
        test=test,
        held=jax.tree.map(lambda a: a[n:], both),
        operator=curvature.OPERATORS[int(test.operator[0])],
        ok=np.asarray(test.converged, bool),
        kappa=kappa,
        resid=resid,
        scale=scale,
        rel_resid=np.max(resid / scale, axis=1),
        distance=distance,
    )


def _density(ctx, opts, member, plan, x_test, spectra: _Spectra) -> _Density:
    """Density of the normalised curvatures kappa / max |kappa| of the converged test points."""
    grid = np.linspace(-1.1, 1.1, 221)
    width = 0.03
    ok = spectra.ok
    if plan.full:
        norm_ok = (spectra.kappa / spectra.scale)[ok]
        flat = np.mean(np.abs(norm_ok) <= 0.1, axis=1)
        # Every curvature is a node of weight 1 / (d - 1): the exact spectral measure.
        weights = np.full(norm_ok.shape, 1.0 / (plan.d - 1))
        density = np.asarray(curvature.spectral_density(norm_ok, weights, grid, width))
        method = f"exact: all d - 1 = {plan.d - 1} curvatures (Lanczos to full depth)"
        return _Density(grid, density, flat, method)
    keys = jax.random.split(jax.random.PRNGKey(opts.seed), plan.n)
    matvecs = min(opts.slq_matvecs, plan.d - 1)

    def dens(p, xi, ki):
        return curvature.curvature_density(
            member.apply_fn,
            p,
            xi,
            ki,
            num_probes=opts.slq_probes,
            num_matvecs=matvecs,
            operator=opts.operator,
            fd_scale=opts.fd_scale,
        )

    slq = ctx.map(
        dens,
        member.params,
        x_test,
        keys,
        in_axes=(None, 0, 0),
        batch_size=opts.batch_size,
        desc=f"SLQ {member.name}",
    )
    nodes = (_f64(slq.nodes) / spectra.scale[:, :, None])[ok]
    weights = _f64(slq.weights)[ok]
    flat = np.sum(weights * (np.abs(nodes) <= 0.1), axis=2).mean(axis=1)
    density = np.asarray(curvature.spectral_density(nodes, weights, grid, width))
    method = (
        f"stochastic Lanczos quadrature ({opts.slq_probes} probes x {matvecs} steps per "
        f"point); kappa normalised by the extreme of the top/bottom {plan.k} Lanczos curvatures"
    )
    return _Density(grid, density, flat, method)


def _shared_subspace(ctx, opts, member, plan, x_test, spectra: _Spectra) -> _Shared:
    """S from the held-out points; how much of the test perturbations lies in S; margins in S."""
    m = min(opts.subspace_dim, plan.d - 1)
    shared = curvature.shared_curved_subspace_at(
        member.apply_fn, member.params, spectra.held, m=m, key=jax.random.PRNGKey(opts.seed)
    )
    basis = np.asarray(shared.basis)
    shape = x_test.shape[1:]
    random_sub = subspaces.random(jax.random.PRNGKey(opts.seed + 1), shape, m)
    curved_sub = subspaces.from_basis(basis, name="shared curved")
    r = np.asarray(spectra.test.boundary_point) - x_test
    desc = f"margins in S {member.name}"
    full_df = ctx.batched(deepfool, member, x_test, batch_size=opts.batch_size, desc=desc)
    both = subspaces.stack([curved_sub, random_sub])
    in_both = ctx.batched(
        subspace_margins, member, x_test, both, batch_size=2 * opts.batch_size, desc=desc
    )
    in_s, in_r = (jax.tree.map(lambda a, i=i: a[:, i], in_both) for i in range(2))
    return _Shared(
        m=m,
        subspace=shared,
        basis=basis,
        ratio=_projection_ratios(r, basis),
        ratio_random=_projection_ratios(r, np.asarray(random_sub.basis)),
        full_df=full_df,
        in_s=in_s,
        in_r=in_r,
    )


def _detection(ctx, opts, member, plan, images, spectra: _Spectra, shared: _Shared) -> _Detection:
    """Asymmetry scores in S: threshold on held-out clean images, ROC against perturbed ones."""
    x_test, y_test, x_held = images
    n, n_held = plan.n, plan.n_held
    held = spectra.held
    held_distance = np.linalg.norm(
        (np.asarray(held.boundary_point) - x_held).reshape(n_held, -1), axis=1
    )
    held_ok = np.asarray(held.converged, bool)
    radius = opts.radius_factor * float(np.median(held_distance[held_ok]) if held_ok.any() else 1.0)
    dirs = detection.curved_directions(
        jax.random.PRNGKey(opts.seed + 2), shared.basis, opts.directions, radius
    )
    pert = np.asarray(shared.full_df.perturbation)
    df_ok = np.asarray(shared.full_df.converged, bool)
    inputs = [x_held, x_test] + [x_test + s * pert for s in opts.scales]
    scored = ctx.map(
        lambda p, xi: detection.asymmetry_score(member.apply_fn, p, xi, dirs),
        member.params,
        np.concatenate(inputs).astype(x_test.dtype),
        in_axes=(None, 0),
        batch_size=opts.batch_size,
        desc=f"asymmetry {member.name}",
    )
    scores = _f64(scored.score)
    recovered = np.asarray(scored.recovered_label)
    held_scores, clean_scores = scores[:n_held], scores[n_held : n_held + n]
    threshold = detection.fit_threshold(held_scores, opts.false_positive_rate)
    clean_label = np.asarray(shared.full_df.label)
    rows: dict[str, dict[str, Any]] = {}
    rocs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, s in enumerate(opts.scales):
        sl = slice(n_held + (i + 1) * n, n_held + (i + 2) * n)
        ps, rec = scores[sl][df_ok], recovered[sl][df_ok]
        flagged = ps > threshold
        fpr, tpr, auc = detection.roc(clean_scores, ps)
        rocs[f"x{s:g}"] = (fpr, tpr)
        rows[f"x{s:g}"] = {
            "auc": auc,
            "detection_rate": base.fraction(flagged),
            "recovery_accuracy_flagged": detection.recovery_accuracy(
                rec, clean_label[df_ok], flagged
            ),
            "recovery_accuracy_all": detection.recovery_accuracy(rec, clean_label[df_ok]),
            "recovery_accuracy_vs_ground_truth": detection.recovery_accuracy(rec, y_test[df_ok]),
        }
    clean_fpr = float(np.mean(clean_scores > threshold))
    return _Detection(radius, threshold, clean_fpr, rows, rocs, scores, recovered)


def _spectrum_summary(plan: _Plan, spectra: _Spectra, density: _Density) -> dict[str, Any]:
    ok = spectra.ok
    kappa_ok = spectra.kappa[ok]
    return {
        "samples": plan.n,
        "held_out": plan.n_held,
        "dimension": plan.d,
        "operator": spectra.operator,
        "median_fd_scale": base.median(_f64(spectra.test.scale))
        if spectra.operator == "fd"
        else None,
        "converged_fraction": float(ok.mean()),
        "median_distance_to_boundary": base.median(_f64(spectra.distance[ok])),
        "spectrum": "full" if plan.full else f"top/bottom {plan.k}",
        "median_max_abs_curvature": base.median(spectra.scale[ok, 0]),
        "median_relative_residual": base.median(spectra.rel_resid[ok]),
        "max_relative_residual": float(np.max(spectra.rel_resid[ok])) if ok.any() else None,
        "flat_fraction_median": base.median(density.flat),
        "flat_fraction_quartiles": base.quantiles(density.flat, [0.25, 0.75]),
        "density_method": density.method,
        "mean_sorted_curvatures": _mean_spectrum(plan, spectra).tolist(),
        "curvature_quantiles_10_90": base.quantiles(kappa_ok, [0.1, 0.9], axis=0),
        "density_grid": density.grid.tolist(),
        "density": density.density.tolist(),
    }


def _subspace_summary(plan: _Plan, ok: np.ndarray, shared: _Shared) -> dict[str, Any]:
    curvatures = np.asarray(shared.subspace.curvatures)
    residual = np.max(np.asarray(shared.subspace.residuals))
    return {
        "subspace_dim": shared.m,
        "subspace_curvatures": curvatures.tolist(),
        "subspace_relative_residual": float(residual / max(np.max(np.abs(curvatures)), 1e-30)),
        "projection_ratio_median": base.median(_f64(shared.ratio[ok])),
        "projection_ratio_random_subspace_median": base.median(_f64(shared.ratio_random[ok])),
        "projection_ratio_baseline_sqrt_m_over_d": curvature.random_baseline(shared.m, plan.d),
        "deepfool_margin_median": base.median(_f64(shared.full_df.margin)),
        "margin_in_S_median": base.median(_f64(shared.in_s.margin)),
        "margin_in_random_subspace_median": base.median(_f64(shared.in_r.margin)),
        "flipped_in_S": base.fraction(shared.in_s.converged),
        "flipped_in_random_subspace": base.fraction(shared.in_r.converged),
    }


def _detection_summary(opts: CurvatureOptions, det: _Detection) -> dict[str, Any]:
    first = f"x{opts.scales[0]:g}"
    return {
        "detection_radius": det.radius,
        "detection_directions": opts.directions,
        "detection_threshold": det.threshold,
        "clean_test_false_positive_rate": det.clean_fpr,
        "detection": det.rows,
        "auc_x1": det.rows[first]["auc"],
        "recovery_x1": det.rows[first]["recovery_accuracy_flagged"],
        "roc": {name: {"fpr": f.tolist(), "tpr": t.tolist()} for name, (f, t) in det.rocs.items()},
    }


def _mean_spectrum(plan: _Plan, spectra: _Spectra) -> np.ndarray:
    kappa_ok = spectra.kappa[spectra.ok]
    return kappa_ok.mean(0) if len(kappa_ok) else np.full(plan.k, np.nan)


def _arrays(spectra: _Spectra, shared: _Shared, det: _Detection) -> dict[str, np.ndarray]:
    test = spectra.test
    return {
        "curvatures": spectra.kappa.astype(np.float32),
        "residuals": spectra.resid.astype(np.float32),
        "converged": spectra.ok,
        "label": np.asarray(test.label),
        "adv_label": np.asarray(test.adv_label),
        "scale": np.asarray(test.scale),
        "distance": spectra.distance.astype(np.float32),
        "shared_basis": shared.basis.astype(np.float32),
        "shared_curvatures": np.asarray(shared.subspace.curvatures),
        "projection_ratio": shared.ratio.astype(np.float32),
        "projection_ratio_random": shared.ratio_random.astype(np.float32),
        "margin": np.asarray(shared.full_df.margin),
        "margin_in_S": np.asarray(shared.in_s.margin),
        "margin_in_random": np.asarray(shared.in_r.margin),
        "scores": det.scores.astype(np.float32),
        "recovered_label": det.recovered_label,
    }


def _plot_data(plan, spectra: _Spectra, density: _Density, shared: _Shared, det: _Detection):
    kappa_ok = spectra.kappa[spectra.ok]
    return {
        "mean": _mean_spectrum(plan, spectra),
        "q": np.quantile(kappa_ok, [0.1, 0.9], axis=0) if len(kappa_ok) else None,
        "grid": density.grid,
        "density": density.density,
        "basis": shared.basis,
        "basis_curvatures": np.asarray(shared.subspace.curvatures),
        "rocs": det.rocs,
        "aucs": {name: row["auc"] for name, row in det.rows.items()},
        "operator": spectra.operator,
    }


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
