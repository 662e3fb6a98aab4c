"""Suite probe "connectivity": are two points of a class joined inside its region?

SPEC.md section 3. For each model: pairs of the three kinds of
``bgeom.paths.PAIR_KINDS`` (two natural test images of a class; a natural image
and an image of another class pushed into it by targeted DeepFool; two such
pushed images), a path search for every pair (``bgeom.paths.find_paths``, the
pairs split over processes in a multi-process run), and
the 2-D plane through x1, x2 and the first anchor of a few paths, coloured by
the model's label.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bgeom.paths import PAIR_KINDS, STATUS_NAMES, find_paths, make_pairs
from bgeom.sharding import split_over_processes
from bgeom.suite import ProbeOutput, SuiteContext, register_probe


def _stats(res: dict[str, np.ndarray], requested: int, made: int) -> dict[str, Any]:
    """Summary numbers of the paths of one model and pair kind."""
    connected = res["connected"]
    anchors = res["num_anchors"][connected]
    ratio = res["length_ratio"][connected]
    tested = int(res["segments_tested"].sum())
    out: dict[str, Any] = {
        "pairs_requested": requested,
        "pairs": int(len(connected)),
        "pushes_failed": requested - made,
        "connected_fraction": float(connected.mean()) if len(connected) else None,
        "not_connected": int((~connected).sum()),
        # The straight segment x1 -> x2 leaves the class (dense re-sampling).
        "straight_leaves_fraction": float((~res["straight_ok"]).mean()) if len(connected) else None,
        "median_anchors": float(np.median(anchors)) if anchors.size else None,
        "max_anchors": int(anchors.max()) if anchors.size else None,
        "median_length_ratio": float(np.median(ratio)) if ratio.size else None,
        "max_length_ratio": float(ratio.max()) if ratio.size else None,
        "segments_tested": tested,
        # Of every segment the search tested (straight ones and sub-segments).
        "tested_segments_leaving_fraction": float(res["segments_crossing"].sum() / tested)
        if tested
        else None,
        "anchors_histogram": np.bincount(anchors).tolist() if anchors.size else [],
        "length_ratios": [round(float(r), 6) for r in ratio],
        "status_counts": {
            STATUS_NAMES[s]: int(c) for s, c in enumerate(np.bincount(res["status"])) if c
        },
    }
    return out


def _plane(points: np.ndarray, num_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Orthonormal basis (e1 along x2 - x1, e2 towards the first anchor) and path coordinates."""
    x1, a1, x2 = points[0].ravel(), points[1].ravel(), points[num_points - 1].ravel()
    d = x2 - x1
    dn = np.linalg.norm(d)
    if dn == 0:
        return None
    e1 = d / dn
    u = (a1 - x1) - np.dot(a1 - x1, e1) * e1
    un = np.linalg.norm(u)
    if un < 1e-6 * dn:
        return None
    e2 = u / un
    flat = points[:num_points].reshape(num_points, -1) - x1
    return e1, e2, np.stack([flat @ e1, flat @ e2], axis=1)


def plane_grid(
    points: np.ndarray, num_points: int, grid: int
) -> tuple[dict[str, Any], np.ndarray] | None:
    """The plane of one path: its coordinates there, and a grid of images covering it.

    Columns of the grid run along e1 (x1 -> x2), rows along e2 (towards the
    first anchor), from -y to +y; the e2 range is at least a fifth of the e1
    span so that a nearly straight path still shows the regions around it.
    """
    plane = _plane(points, num_points)
    if plane is None:
        return None
    e1, e2, coords = plane
    span = max(float(coords[:, 0].max() - coords[:, 0].min()), 1e-6)
    lo_x, hi_x = coords[:, 0].min() - 0.25 * span, coords[:, 0].max() + 0.25 * span
    half_y = max(1.5 * float(np.abs(coords[:, 1]).max()), 0.2 * span)
    ss, tt = np.meshgrid(np.linspace(lo_x, hi_x, grid), np.linspace(-half_y, half_y, grid))
    x1 = points[0]
    images = x1.ravel()[None] + ss.reshape(-1, 1) * e1[None] + tt.reshape(-1, 1) * e2[None]
    info = {
        "extent": [float(lo_x), float(hi_x), float(-half_y), float(half_y)],
        "path": np.round(coords, 6).tolist(),
    }
    return info, images.reshape((-1,) + x1.shape).astype(x1.dtype)


@register_probe(
    "connectivity",
    pairs=12,
    kinds=list(PAIR_KINDS),
    max_anchors=31,
    max_depth=10,
    samples=100,
    verify_samples=128,
    overshoot=0.02,
    max_iter=50,
    batch=16,
    batch_size=128,
    examples=3,
    grid=41,
    seed=0,
)
def connectivity_probe(ctx: SuiteContext, spec: dict[str, Any]) -> ProbeOutput:
    """Connectivity of class regions: paths between same-class points that never leave the class."""
    summary: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    notes: list[str] = []
    figures: dict[str, Any] = {}
    kinds = list(spec["kinds"])
    for k in kinds:
        if k not in PAIR_KINDS:
            raise ValueError(f"connectivity: unknown pair kind {k!r}; choose from {PAIR_KINDS}.")
    per_model: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key in spec["models"]:
        members = ctx.members(key)
        if len(members) > 1:
            notes.append(f"{key}: an ensemble of {len(members)}; only member 0 is analysed.")
        apply_fn, params = members[0]
        x, _ = ctx.test_inputs(key)
        predict = lambda p, xi, apply_fn=apply_fn: jnp.argmax(apply_fn(p, xi)).astype(jnp.int32)

        def mapper(fn, *args, in_axes, desc=f"connectivity {key}"):
            return ctx.map(fn, *args, in_axes=in_axes, batch_size=spec["batch_size"], desc=desc)

        labels = np.asarray(mapper(predict, params, x, in_axes=(None, 0)))
        pairs = make_pairs(
            jax.random.PRNGKey(int(spec["seed"])),
            apply_fn,
            params,
            x,
            int(spec["pairs"]),
            tuple(kinds),
            labels=labels,
            overshoot=spec["overshoot"],
            max_iter=spec["max_iter"],
            map_fn=mapper,
        )
        v = pairs.valid
        # One pooled search over all pairs of all kinds (find_paths, not ctx.map:
        # a vmap over pairs would make every pair wait for the hardest one); in a
        # multi-process run each process searches its share of the pairs.
        search = functools.partial(
            find_paths,
            apply_fn,
            params,
            batch=int(spec["batch"]),
            max_anchors=int(spec["max_anchors"]),
            max_depth=int(spec["max_depth"]),
            samples=int(spec["samples"]),
            verify_samples=int(spec["verify_samples"]),
            overshoot=spec["overshoot"],
            max_iter=int(spec["max_iter"]),
        )
        res = split_over_processes(search, pairs.x1[v], pairs.x2[v])
        res = {f: np.asarray(getattr(res, f)) for f in res._fields}
        kind = pairs.kind[v]
        for field in (
            "connected",
            "num_anchors",
            "length_ratio",
            "straight_ok",
            "status",
            "segments_tested",
            "segments_crossing",
            "distance",
            "label",
        ):
            arrays[f"{key}/{field}"] = res[field]
        arrays[f"{key}/kind"] = kind
        per_model[key] = {}
        made_all = int(v.sum())
        summary[f"{key}/all"] = _stats(
            {f: a for f, a in res.items() if f != "points"},
            int(spec["pairs"]) * len(kinds),
            made_all,
        )
        for k in kinds:
            ki = PAIR_KINDS.index(k)
            sel = {f: a[kind == ki] for f, a in res.items() if f != "points"}
            made = int(np.sum(v & (pairs.kind == ki)))
            per_model[key][k] = sel
            summary[f"{key}/{k}"] = _stats(sel, int(spec["pairs"]), made)
            if made < int(spec["pairs"]):
                notes.append(
                    f"{key}/{k}: targeted DeepFool did not move {int(spec['pairs']) - made} "
                    "source image(s) into the target class; those pairs are left out."
                )
        failed = ~res["connected"]
        if failed.any():
            reasons = {
                STATUS_NAMES[s]: int(c)
                for s, c in enumerate(np.bincount(res["status"][failed]))
                if c
            }
            notes.append(
                f"{key}: {int(failed.sum())} of {len(failed)} pairs have no verified path "
                f"({reasons}). "
                "max_anchors / max_depth mean the search budget ran out (undecided), "
                "not that the region is disconnected."
            )

        # Planes through x1, x2 and the first anchor of a few paths with anchors.
        with_anchor = np.flatnonzero(res["connected"] & (res["num_anchors"] >= 1))
        pick = _spread(with_anchor, kind, int(spec["examples"]))
        planes, grids = [], []
        for i in pick:
            made_plane = plane_grid(res["points"][i], int(res["num_points"][i]), int(spec["grid"]))
            if made_plane is None:
                continue
            plane, points = made_plane
            plane.update(
                pair=int(i),
                kind=PAIR_KINDS[int(kind[i])],
                label=int(res["label"][i]),
                anchors=int(res["num_anchors"][i]),
                length_ratio=float(res["length_ratio"][i]),
            )
            planes.append(plane)
            grids.append(points)
        if planes:
            # All grids in one batched call: one compilation per model.
            labs = np.asarray(
                mapper(predict, params, np.concatenate(grids), in_axes=(None, 0), desc="planes")
            ).reshape(len(planes), int(spec["grid"]), int(spec["grid"]))
            for j, (plane, lab) in enumerate(zip(planes, labs, strict=True)):
                plane["map"] = lab
                arrays[f"{key}/plane{j}/labels"] = lab
                arrays[f"{key}/plane{j}/path"] = np.asarray(plane["path"])
        if planes:
            figures[f"planes-{key}"] = plot_planes(planes, key, ctx.model_dataset(key).num_classes)
            summary[f"{key}/all"]["planes"] = {
                f"example{j}": {k2: v2 for k2, v2 in p.items() if k2 != "map"}
                for j, p in enumerate(planes)
            }
        else:
            notes.append(
                f"{key}: no connected path needed an anchor, so there is no plane through a "
                "first anchor to draw."
            )
    figures["summary"] = plot_summary(per_model, kinds)
    notes.append(
        "Anchors come from minimal targeted DeepFool pushes (overshoot "
        f"{spec['overshoot']}); they sit just inside the region, so the anchor counts "
        "depend on that overshoot. Plane maps are stored in the .npz file "
        "(<model>/plane<j>/labels, rows along e2 from -y to +y, columns along e1)."
    )
    return ProbeOutput(summary=summary, arrays=arrays, figures=figures, notes=notes)


def _spread(candidates: np.ndarray, kind: np.ndarray, k: int) -> list[int]:
    """Up to ``k`` candidates, cycling over the pair kinds so each kind is shown."""
    by_kind = [list(candidates[kind[candidates] == q]) for q in range(len(PAIR_KINDS))]
    out: list[int] = []
    while len(out) < k and any(by_kind):
        for group in by_kind:
            if group and len(out) < k:
                out.append(int(group.pop(0)))
    return out


def plot_planes(planes: list[dict[str, Any]], title: str, num_classes: int):
    """Classification maps of planes through x1, x2 and the first anchor, with the paths."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cmap = ListedColormap(
        (plt.cm.tab10.colors if num_classes <= 10 else plt.cm.tab20.colors)[:num_classes]
    )
    norm = BoundaryNorm(np.arange(num_classes + 1) - 0.5, num_classes)
    fig, axes = plt.subplots(1, len(planes), figsize=(4.2 * len(planes), 3.8), squeeze=False)
    for ax, p in zip(axes[0], planes, strict=True):
        ax.imshow(
            p["map"],
            origin="lower",
            extent=p["extent"],
            aspect="auto",
            cmap=cmap,
            norm=norm,
            interpolation="nearest",
        )
        path = np.asarray(p["path"])
        ax.plot(path[[0, -1], 0], path[[0, -1], 1], "w--", lw=1.2, label="straight segment")
        ax.plot(path[:, 0], path[:, 1], "k-", lw=1.6, label="path (projected)")
        ax.plot(path[1:-1, 0], path[1:-1, 1], "ko", ms=3.5)
        ax.plot(path[[0, -1], 0], path[[0, -1], 1], "ks", ms=6, mfc="w")
        ax.set_title(
            f"{p['kind']}, class {p['label']}: {p['anchors']} anchor(s)\n"
            f"length / distance = {p['length_ratio']:.4f}",
            fontsize=9,
        )
        ax.set_xlabel("along x2 - x1")
        ax.set_ylabel("towards the first anchor")
        present = np.unique(p["map"])
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(int(c))) for c in present]
        ax.legend(
            handles + ax.get_lines()[:2],
            [f"class {int(c)}" for c in present] + ["straight", "path"],
            fontsize=6,
            loc="upper right",
            framealpha=0.8,
        )
    fig.suptitle(
        f"{title}: model labels in the plane through x1, x2 and the first anchor "
        "(later anchors projected)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_summary(per_model: dict[str, dict[str, dict[str, np.ndarray]]], kinds: list[str]):
    """Fraction connected vs straight segments leaving, anchors, and path length ratios."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))
    models = list(per_model)
    groups = [(m, k) for m in models for k in kinds]
    xs = np.arange(len(groups))
    connected = [
        per_model[m][k]["connected"].mean() if per_model[m][k]["connected"].size else 0
        for m, k in groups
    ]
    leaves = [
        (~per_model[m][k]["straight_ok"]).mean() if per_model[m][k]["straight_ok"].size else 0
        for m, k in groups
    ]
    ax1.bar(xs - 0.2, connected, 0.4, label="pairs connected", color="tab:green")
    ax1.bar(xs + 0.2, leaves, 0.4, label="straight segment leaves the class", color="tab:red")
    ax1.set_xticks(xs)
    ax1.set_xticklabels([f"{m}\n{k}" for m, k in groups], rotation=60, ha="right", fontsize=7)
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("fraction of pairs")
    ax1.legend(fontsize=7)
    ax1.set_title("Pairs connected / straight segment leaves the class", fontsize=9)

    top = max(
        (
            int(per_model[m][k]["num_anchors"].max())
            for m, k in groups
            if per_model[m][k]["num_anchors"].size
        ),
        default=0,
    )
    bins = np.arange(top + 2) - 0.5
    for m, color in zip(models, plt.cm.tab10.colors, strict=False):
        a = np.concatenate(
            [per_model[m][k]["num_anchors"][per_model[m][k]["connected"]] for k in kinds]
        )
        ax2.hist(a, bins=bins, histtype="step", lw=1.8, color=color, label=f"{m} (n={a.size})")
    ax2.set_xlabel("anchors of a connected path")
    ax2.set_ylabel("pairs")
    ax2.set_yscale("log")
    ax2.legend(fontsize=7)
    ax2.set_title("Number of anchors (all pair kinds)", fontsize=9)

    for j, (m, k) in enumerate(groups):
        r = per_model[m][k]["length_ratio"][per_model[m][k]["connected"]]
        jitter = np.linspace(-0.25, 0.25, r.size) if r.size > 1 else np.zeros(r.size)
        ax3.plot(j + jitter, r, ".", color=plt.cm.tab10.colors[models.index(m) % 10], ms=4)
    ax3.set_xticks(xs)
    ax3.set_xticklabels([f"{m}\n{k}" for m, k in groups], rotation=60, ha="right", fontsize=7)
    ax3.set_ylabel("path length / straight distance")
    ax3.set_title("Path length / straight distance (connected pairs)", fontsize=9)
    fig.tight_layout()
    return fig
