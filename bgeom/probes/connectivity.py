"""Suite probe "connectivity": are two points of a class joined inside its region?

Method: docs/connectivity.md. For every model member: pairs of the three kinds
of ``bgeom.paths.PAIR_KINDS`` (two natural test images of a class; a natural
image and an image of another class pushed into it by targeted DeepFool; two
such pushed images), a path search for every pair (``bgeom.paths.find_paths``,
the pairs split over processes in a multi-process run), and the 2-D plane
through x1, x2 and the first anchor of a few paths, coloured by the model's
label.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bgeom.boundary import DeepFoolOptions
from bgeom.paths import PAIR_KINDS, STATUS_NAMES, find_paths, make_pairs
from bgeom.probes import base
from bgeom.probes.base import Member, ProbeOptions, ProbeOutput, SuiteContext, option
from bgeom.sharding import split_over_processes

# The per-pair results kept as arrays <name>/<field> (PathResult's converged is saved as
# "connected").
_FIELDS = (
    "connected",
    "num_anchors",
    "length_ratio",
    "straight_ok",
    "status",
    "segments_tested",
    "segments_crossing",
    "distance",
    "label",
)


@dataclasses.dataclass(frozen=True)
class ConnectivityOptions(ProbeOptions):
    """Options of the connectivity probe (docs/connectivity.md)."""

    pairs: int = option(12, "pairs per kind and model member", ge=1)
    kinds: tuple[str, ...] = option(PAIR_KINDS, "pair kinds to draw", choices=PAIR_KINDS)
    max_anchors: int = option(31, "most anchors of one path", ge=0)
    max_depth: int = option(10, "most halvings of a segment", ge=0)
    samples: int = option(100, "points tested on each segment during the search", ge=3)
    verify_samples: int = option(128, "points re-tested on each final segment", ge=100)
    overshoot: float = option(0.02, "overshoot of the targeted DeepFool pushes", ge=0)
    max_iter: int = option(50, "most steps of a targeted DeepFool push", ge=0)
    batch: int = option(16, "pending segments tested together by find_paths", ge=1)
    batch_size: int = option(128, "images per compiled batch (labels, pushes, planes)", ge=1)
    examples: int = option(3, "paths drawn in their plane per member", ge=0)
    grid: int = option(41, "side of the label grid of each plane", ge=1)
    seed: int = option(0, "seed of the pair draw")


def _stats(res: dict[str, np.ndarray], requested: int, made: int) -> dict[str, Any]:
    """Summary numbers of the paths of one member and pair kind."""
    connected = res["connected"]
    anchors = res["num_anchors"][connected]
    ratio = res["length_ratio"][connected]
    tested = int(res["segments_tested"].sum())
    return {
        "pairs_requested": requested,
        "pairs": int(len(connected)),
        "pushes_failed": requested - made,
        "connected_fraction": base.fraction(connected),
        "not_connected": int((~connected).sum()),
        # The straight segment x1 -> x2 leaves the class (dense re-sampling).
        "straight_leaves_fraction": base.fraction(~res["straight_ok"]),
        "median_anchors": base.median(anchors),
        "max_anchors": int(anchors.max()) if anchors.size else None,
        "median_length_ratio": base.median(ratio),
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


@base.register_probe("connectivity", ConnectivityOptions)
def connectivity_probe(
    ctx: SuiteContext, opts: ConnectivityOptions, *, probe_id: str, models: tuple[str, ...]
) -> ProbeOutput:
    """Connectivity of class regions: paths between same-class points that never leave the class."""
    out = ProbeOutput(summary={})
    per_member: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for member in ctx.all_members(models):
        per_member[member.name] = _analyse_member(ctx, opts, member, out)
    out.figures["summary"] = plot_summary(per_member, list(opts.kinds))
    out.notes.append(
        "Anchors come from minimal targeted DeepFool pushes (overshoot "
        f"{opts.overshoot}); they sit just inside the region, so the anchor counts "
        "depend on that overshoot. Plane maps are stored in the .npz file "
        "(<model>/plane<j>/labels, rows along e2 from -y to +y, columns along e1)."
    )
    return out


def _analyse_member(
    ctx: SuiteContext, opts: ConnectivityOptions, member: Member, out: ProbeOutput
) -> dict[str, dict[str, np.ndarray]]:
    """Pairs, paths, summaries and planes of one member; returns its results per kind."""
    name = member.name
    x, _ = ctx.test_inputs(member.model)
    mapper = functools.partial(_mapper, ctx, opts.batch_size, f"connectivity {name}")
    predict = _predictor(member.apply_fn)
    labels = np.asarray(mapper(predict, member.params, x, in_axes=(None, 0)))
    push = DeepFoolOptions(overshoot=opts.overshoot, max_iter=opts.max_iter)
    pairs = make_pairs(
        jax.random.PRNGKey(opts.seed),
        member.apply_fn,
        member.params,
        x,
        opts.pairs,
        opts.kinds,
        labels=labels,
        push=push,
        map_fn=mapper,
    )
    v = pairs.valid
    # One pooled search over all pairs of all kinds (find_paths, not ctx.map:
    # a vmap over pairs would make every pair wait for the hardest one); in a
    # multi-process run each process searches its share of the pairs.
    search = functools.partial(
        find_paths,
        member.apply_fn,
        member.params,
        batch=opts.batch,
        max_anchors=opts.max_anchors,
        max_depth=opts.max_depth,
        samples=opts.samples,
        verify_samples=opts.verify_samples,
        push=push,
    )
    found = split_over_processes(search, pairs.x1[v], pairs.x2[v])
    res = {f: np.asarray(getattr(found, f)) for f in found._fields}
    res["connected"] = res.pop("converged")
    kind = pairs.kind[v]
    for field in _FIELDS:
        out.arrays[f"{name}/{field}"] = res[field]
    out.arrays[f"{name}/kind"] = kind
    per_kind = _summaries(opts, name, res, kind, pairs, out)
    _planes(ctx, opts, member, res, kind, functools.partial(mapper, predict), out)
    return per_kind


def _mapper(ctx: SuiteContext, batch_size: int, default_desc: str, fn, *args, in_axes, desc=None):
    return ctx.map(fn, *args, in_axes=in_axes, batch_size=batch_size, desc=desc or default_desc)


def _predictor(apply_fn):
    """The predicted class of one example, as int32."""
    return lambda p, xi: jnp.argmax(apply_fn(p, xi)).astype(jnp.int32)


def _summaries(
    opts: ConnectivityOptions,
    name: str,
    res: dict[str, np.ndarray],
    kind: np.ndarray,
    pairs: Any,
    out: ProbeOutput,
) -> dict[str, dict[str, np.ndarray]]:
    """Summary entries <name>/all and <name>/<kind>, with notes on failures."""
    v = pairs.valid
    flat = {f: a for f, a in res.items() if f != "points"}
    out.summary[f"{name}/all"] = _stats(flat, opts.pairs * len(opts.kinds), int(v.sum()))
    per_kind = {}
    for k in opts.kinds:
        ki = PAIR_KINDS.index(k)
        per_kind[k] = {f: a[kind == ki] for f, a in flat.items()}
        made = int(np.sum(v & (pairs.kind == ki)))
        out.summary[f"{name}/{k}"] = _stats(per_kind[k], opts.pairs, made)
        if made < opts.pairs:
            out.notes.append(
                f"{name}/{k}: targeted DeepFool did not move {opts.pairs - made} "
                "source image(s) into the target class; those pairs are left out."
            )
    failed = ~res["connected"]
    if failed.any():
        reasons = {
            STATUS_NAMES[s]: int(c) for s, c in enumerate(np.bincount(res["status"][failed])) if c
        }
        out.notes.append(
            f"{name}: {int(failed.sum())} of {len(failed)} pairs have no verified path "
            f"({reasons}). "
            "max_anchors / max_depth mean the search budget ran out (undecided), "
            "not that the region is disconnected."
        )
    return per_kind


def _planes(
    ctx: SuiteContext,
    opts: ConnectivityOptions,
    member: Member,
    res: dict[str, np.ndarray],
    kind: np.ndarray,
    label_map,
    out: ProbeOutput,
) -> None:
    """Planes through x1, x2 and the first anchor of a few paths with anchors.

    ``label_map(params, images, in_axes=..., desc=...)`` gives the member's labels of images.
    """
    name = member.name
    with_anchor = np.flatnonzero(res["connected"] & (res["num_anchors"] >= 1))
    planes, grids = [], []
    for i in _spread(with_anchor, kind, opts.examples):
        made_plane = plane_grid(res["points"][i], int(res["num_points"][i]), opts.grid)
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
    if not planes:
        out.notes.append(
            f"{name}: no connected path needed an anchor, so there is no plane through a "
            "first anchor to draw."
        )
        return
    # All grids in one batched call: one compilation per member.
    labs = np.asarray(
        label_map(
            member.params,
            np.concatenate(grids),
            in_axes=(None, 0),
            desc="planes",
        )
    ).reshape(len(planes), opts.grid, opts.grid)
    for j, (plane, lab) in enumerate(zip(planes, labs, strict=True)):
        plane["map"] = lab
        out.arrays[f"{name}/plane{j}/labels"] = lab
        out.arrays[f"{name}/plane{j}/path"] = np.asarray(plane["path"])
    num_classes = ctx.model_dataset(member.model).num_classes
    out.figures[f"planes-{name}"] = plot_planes(planes, name, num_classes)
    out.summary[f"{name}/all"]["planes"] = {
        f"example{j}": {k: v for k, v in p.items() if k != "map"} for j, p in enumerate(planes)
    }


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
