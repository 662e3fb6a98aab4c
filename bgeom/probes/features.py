"""Suite probe "features": class polyhedra, convex hulls and morphing in the last hidden layer.

Method: docs/features.md. For every model member, with the training images'
features ``phi(x)`` and the last layer ``(W, b)`` (``bgeom.features.last_layer``):

- containment: per class, whether the hull of its training features lies in
  its polyhedron, against its training accuracy (they must agree), plus
  sampled convex combinations of each class's features, classified;
- the facets of each class polyhedron (HiGHS LPs);
- the fraction of test points outside the training hull, in pixel space and in
  feature space, per class and overall (exact membership);
- the closest point of the decision boundary to each test feature vector, and
  whether it lies in the hull of its class's training features;
- images whose features reach a few of those boundary points (optax);
- morphing: the features of pixel interpolations between training images
  against the straight path in feature space (hull exits, boundary crossings).

Every hull problem of a member has the same shapes (pixel vectors are padded
with zeros to the feature dimension, which changes no distance), so the hull
solver compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from bgeom import features as F
from bgeom.probes import base
from bgeom.probes.base import Member, ProbeOptions, ProbeOutput, SuiteContext, option


@dataclasses.dataclass(frozen=True)
class FeaturesOptions(ProbeOptions):
    """Options of the features probe (docs/features.md)."""

    samples: int = option(360, "test images per model (the first ones of the test split)", ge=1)
    max_train: int = option(2000, "training images whose hulls are built (the first ones)", ge=2)
    pairs: int = option(
        4, "pairs of training images morphed (same class and other class alternate)", ge=0
    )
    steps: int = option(17, "points on each morphing path", ge=2)
    reach: int = option(4, "test images whose features are driven to their boundary point", ge=0)
    reach_steps: int = option(200, "Adam steps of each reach", ge=1)
    reach_rate: float = option(0.01, "Adam step size of each reach", gt=0)
    combinations: int = option(200, "random convex combinations sampled per class hull", ge=0)
    batch_size: int = option(128, "queries per compiled batch", ge=1)
    seed: int = option(0, "seed of the morphing pairs and of the sampled combinations")


def _boundary_nonnegative(w, b, f):
    return F.closest_boundary_point(w, b, f, nonnegative=True)


def _boundary_free(w, b, f):
    return F.closest_boundary_point(w, b, f, nonnegative=False)


def _pad(a: np.ndarray, dim: int) -> np.ndarray:
    a = np.asarray(a, np.float32).reshape(len(a), -1)
    return np.pad(a, ((0, 0), (0, dim - a.shape[1])))


def _radius(points: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(points - points.mean(0), axis=1))) or 1.0


@base.register_probe("features", FeaturesOptions)
def features_probe(
    ctx: SuiteContext, opts: FeaturesOptions, *, probe_id: str, models: tuple[str, ...]
) -> ProbeOutput:
    """Feature-space geometry: class polyhedra, training hulls (pixels vs features), morphing."""
    out = ProbeOutput(summary={})
    outside: dict[str, dict[str, np.ndarray]] = {}
    distances: dict[str, dict[str, np.ndarray]] = {}
    for member in ctx.all_members(models):
        if member.features_fn is None:
            out.notes.append(f"{member.name}: the model exposes no features; skipped.")
            continue
        res = _analyse(ctx, opts, member, out)
        outside[member.name] = res["outside"]
        distances[member.name] = res["distances"]
        out.figures[f"projection-{member.name}"] = plot_projection(
            res["projection"], title=member.name
        )
        if opts.pairs:
            out.figures[f"morph-{member.name}"] = plot_morphing(res["morph"], title=member.name)
    if outside:
        out.figures["outside"] = plot_outside(outside)
        out.figures["distances"] = plot_distances(distances)
    out.notes.append(
        "Membership in a convex hull is decided in float64 up to 1e-6 of the point set's "
        "radius (float32 rounding puts a point of a hull edge about 1e-7 off it): outside "
        "when a hyperplane certifiably separates the point, inside when a convex combination "
        "of training points lies within that tolerance, a HiGHS LP otherwise. Distances are "
        "relative to the training set's radius in that space (its largest distance from the "
        "centroid). The projection figure is the plane of the two principal components of "
        "the training features through their mean: the class regions are that plane's slice "
        "of the polyhedra, the hulls those of the projected points. A feature vector is "
        "reachable only if it lies in the image of the pixel box under the feature map, a set "
        "of dimension at most the number of pixels: the reach error says how close images get."
    )
    return out


def _analyse(
    ctx: SuiteContext, opts: FeaturesOptions, member: Member, out: ProbeOutput
) -> dict[str, Any]:
    """Every analysis of one member; fills ``out`` and returns what the figures need."""
    name = member.name
    x_tr, y_tr = ctx.train_inputs(member.model, opts.max_train)
    x_te, y_te = ctx.test_inputs(member.model, opts.samples)
    num_classes = ctx.model_dataset(member.model).num_classes

    def mapped(fn, *args, in_axes, desc, batch=opts.batch_size):
        # Mapped arguments padded to whole batches: one compiled shape per function.
        n = next(len(a) for a, ax in zip(args, in_axes, strict=True) if ax == 0)
        size = max(batch, -(-n // batch) * batch)

        def pad(a):
            return np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)])

        args = [pad(np.asarray(a)) if ax == 0 else a for a, ax in zip(args, in_axes, strict=True)]
        res = ctx.map(fn, *args, in_axes=in_axes, batch_size=batch, desc=desc)
        return jax.tree.map(lambda a: a[:n], res)

    def feats(x):
        return np.asarray(
            mapped(member.features_fn, member.params, x, in_axes=(None, 0), desc=f"features {name}")
        )

    f_tr, f_te = feats(x_tr), feats(x_te)
    w, b = (np.asarray(a) for a in F.last_layer(member.params))
    nonneg = bool(f_tr.min() >= 0)
    dim = max(f_tr.shape[1], int(np.prod(x_tr.shape[1:])))
    hull_map = functools.partial(mapped, desc=f"hulls {name}")
    rng = np.random.default_rng(opts.seed)
    summary: dict[str, Any] = {
        "train": len(x_tr),
        "test": len(x_te),
        "feature_dim": int(f_tr.shape[1]),
        "nonnegative_features": nonneg,
    }

    # Containment, checked against the training accuracy and by sampled hull points.
    cont = jax.tree.map(np.asarray, F.containment(f_tr, y_tr, w, b))
    sampled = []
    for c in range(num_classes):
        own = f_tr[y_tr == c]
        if not len(own) or not opts.combinations:
            sampled.append(None)
            continue
        combos = rng.dirichlet(np.ones(len(own)), opts.combinations) @ own
        sampled.append(float(np.mean(np.argmax(combos @ w.T + b, 1) == c)))
    has = cont.count > 0
    summary["containment"] = {
        "inside": [bool(v) for v in cont.inside],
        "train_accuracy_per_class": [
            float(v) if h else None for v, h in zip(cont.accuracy, has, strict=True)
        ],
        "matches_accuracy": bool(np.all(cont.inside[has] == (cont.accuracy[has] == 1.0))),
        "classes_inside": int(cont.inside.sum()),
        "min_margin": base.json_safe([float(v) for v in cont.min_margin]),
        "sampled_hull_points_in_region": sampled,
    }
    summary["train_accuracy"] = float(np.mean(np.argmax(f_tr @ w.T + b, 1) == y_tr))
    # The last layer read from the parameters must give the model's logits.
    logits = mapped(member.apply_fn, member.params, x_te, in_axes=(None, 0), desc=f"logits {name}")
    summary["head_max_logit_error"] = float(np.max(np.abs(f_te @ w.T + b - np.asarray(logits))))
    if summary["head_max_logit_error"] > 1e-3 * (1 + float(np.max(np.abs(logits)))):
        out.notes.append(
            f"{name}: W phi(x) + b differs from the model's logits by "
            f"{summary['head_max_logit_error']:.3g}; its last layer is not the 'head' read here."
        )
    summary["facets_per_class"] = [
        int(F.class_facets(w, b, c, nonnegative=nonneg).is_facet.sum()) for c in range(num_classes)
    ]

    # Test points outside the training hull: pixels and features.
    lp_calls = 0
    outside, dists = {}, {}
    for space, train, test in (("pixel", x_tr, x_te), ("feature", f_tr, f_te)):
        p, q = _pad(train, dim), _pad(test, dim)
        frac = F.outside_fractions(p, y_tr, q, y_te, num_classes=num_classes, map_fn=hull_map)
        lp_calls += frac.lp_calls
        radius = _radius(p)
        rel, rel_class = frac.distance / radius, frac.class_distance / radius
        summary.setdefault("outside", {})[space] = {
            "overall": frac.overall,
            "per_class": base.json_safe(frac.per_class.tolist()),
            "median_relative_distance": base.median(rel),
            "class_median_relative_distance": base.median(rel_class),
        }
        outside[space] = frac.per_class
        outside[f"{space}_overall"] = np.array(frac.overall)
        dists[space] = rel
        out.arrays[f"{name}/{space}_outside"] = frac.outside
        out.arrays[f"{name}/{space}_outside_class"] = frac.outside_class
        out.arrays[f"{name}/{space}_distance"] = frac.distance
        out.arrays[f"{name}/{space}_class_distance"] = frac.class_distance

    # The closest boundary point of each test feature vector, and the class hull.
    fn = _boundary_nonnegative if nonneg else _boundary_free
    bnd = mapped(fn, w, b, f_te, in_axes=(None, None, 0), desc=f"boundary {name}")
    ok = np.asarray(bnd.converged)
    p_feat = _pad(f_tr, dim)
    inside_hull = np.zeros(len(f_te), bool)
    hull_dist = np.full(len(f_te), np.nan)
    if ok.any():
        pts = np.asarray(bnd.point)[ok]
        masks = y_tr[None, :] == np.asarray(bnd.label)[ok][:, None]
        keep = masks.any(1)
        mem = F.hull_membership(p_feat, _pad(pts[keep], dim), mask=masks[keep], map_fn=hull_map)
        lp_calls += int(np.sum(mem.method == F.MEMBERSHIP_METHODS.index("lp")))
        where = np.flatnonzero(ok)[keep]
        inside_hull[where], hull_dist[where] = mem.inside, mem.distance
    radius_f = _radius(p_feat)
    summary["boundary"] = {
        "converged_fraction": base.fraction(ok),
        "median_distance": base.median(np.asarray(bnd.distance)[ok]),
        "median_relative_distance": base.median(np.asarray(bnd.distance)[ok] / radius_f),
        "inside_class_hull_fraction": base.fraction(inside_hull[ok]),
        "median_relative_hull_distance": base.median(hull_dist[ok] / radius_f),
    }
    out.arrays[f"{name}/boundary_distance"] = np.asarray(bnd.distance)
    out.arrays[f"{name}/boundary_inside_class_hull"] = inside_hull
    out.arrays[f"{name}/boundary_hull_distance"] = hull_dist

    # Images whose features reach some of those boundary points.
    chosen = np.flatnonzero(ok)[: opts.reach]
    if len(chosen):
        reach = mapped(
            functools.partial(
                F.reach_features,
                member.features_fn,
                steps=opts.reach_steps,
                learning_rate=opts.reach_rate,
            ),
            member.params,
            x_te[chosen],
            np.asarray(bnd.point)[chosen],
            in_axes=(None, 0, 0),
            desc=f"reach {name}",
            batch=len(chosen),
        )
        summary["reach"] = {
            "images": len(chosen),
            "median_error": base.median(reach.error),
            "median_initial_error": base.median(reach.initial_error),
            "reached_fraction": base.fraction(reach.converged),
            "median_pixel_distance": base.median(reach.distance),
        }
        out.arrays[f"{name}/reach_error"] = np.asarray(reach.error)

    morph = _morph(ctx, opts, member, x_tr, y_tr, p_feat, (w, b), dim, mapped, hull_map, rng)
    summary["morph"] = morph["summary"]
    lp_calls += morph["lp_calls"]
    for key, value in morph["arrays"].items():
        out.arrays[f"{name}/{key}"] = value
    summary["lp_calls"] = lp_calls
    out.summary[name] = summary
    out.arrays[f"{name}/containment"] = cont.inside
    out.arrays[f"{name}/train_accuracy_per_class"] = cont.accuracy
    return {
        "outside": outside,
        "distances": dists,
        "projection": _projection(f_tr, y_tr, w, b, morph),
        "morph": morph,
    }


def _pairs(rng: np.random.Generator, labels: np.ndarray, num: int) -> np.ndarray:
    """``num`` index pairs: even ones of one class, odd ones of two classes."""
    out = []
    for k in range(num):
        i = int(rng.integers(len(labels)))
        same = np.flatnonzero((labels == labels[i]) & (np.arange(len(labels)) != i))
        other = np.flatnonzero(labels != labels[i])
        pool = same if (k % 2 == 0 and len(same)) or not len(other) else other
        out.append((i, int(rng.choice(pool)) if len(pool) else i))
    return np.array(out, int).reshape(-1, 2)


def _morph(ctx, opts, member, x_tr, y_tr, p_feat, head, dim, mapped, hull_map, rng):
    """Morphing paths between training images, with exact hull membership along them."""
    if not opts.pairs:
        return {"summary": [], "arrays": {}, "lp_calls": 0}
    pairs = _pairs(rng, y_tr, opts.pairs)
    fn = member.features_fn

    def one(params, w, b, x1, x2):
        return F.morph(fn, params, x1, x2, (w, b), steps=opts.steps)

    res = mapped(
        one,
        member.params,
        *head,
        x_tr[pairs[:, 0]],
        x_tr[pairs[:, 1]],
        in_axes=(None, None, None, 0, 0),
        desc=f"morph {member.name}",
        batch=len(pairs),
    )
    p, s = len(pairs), opts.steps
    paths = np.concatenate([np.asarray(res.features), np.asarray(res.straight)]).reshape(
        2 * p * s, -1
    )
    mem = F.hull_membership(p_feat, _pad(paths, dim), map_fn=hull_map)
    out_pix, out_str = (~mem.inside).reshape(2, p, s)
    dist_pix, dist_str = mem.distance.reshape(2, p, s)
    t = np.asarray(res.t)[0]

    def first(hit):
        return float(t[np.argmax(hit)]) if hit.any() else None

    summary = [
        {
            "same_class": bool(y_tr[i] == y_tr[j]),
            "labels": [int(y_tr[i]), int(y_tr[j])],
            "crossing": base.json_safe(float(res.crossing[k])),
            "straight_crossing": base.json_safe(float(res.straight_crossing[k])),
            "exit": first(out_pix[k]),
            "straight_exit": first(out_str[k]),
            "outside_fraction": float(out_pix[k].mean()),
            "straight_outside_fraction": float(out_str[k].mean()),
            "max_deviation": float(np.max(res.deviation[k])),
            "max_hull_distance": float(dist_pix[k].max()),
            "straight_max_hull_distance": float(dist_str[k].max()),
        }
        for k, (i, j) in enumerate(pairs)
    ]
    arrays = {
        "morph_pairs": pairs,
        "morph_hull_distance": dist_pix,
        "morph_straight_hull_distance": dist_str,
        "morph_outside": out_pix,
        "morph_labels": np.asarray(res.labels),
        "morph_deviation": np.asarray(res.deviation),
    }
    lp = int(np.sum(mem.method == F.MEMBERSHIP_METHODS.index("lp")))
    return {
        "summary": summary,
        "arrays": arrays,
        "lp_calls": lp,
        "t": t,
        "features": np.asarray(res.features),
        "straight": np.asarray(res.straight),
        "hull_distance": dist_pix,
        "straight_hull_distance": dist_str,
        "labels": np.asarray(res.labels),
        "crossing": np.asarray(res.crossing),
        "straight_crossing": np.asarray(res.straight_crossing),
    }


def _projection(f_tr, y_tr, w, b, morph, grid: int = 120) -> dict[str, Any]:
    """The plane of the top two principal components of the training features through
    their mean: projected points, the class of every point of a grid on the plane, and
    the first morphing path."""
    mean = f_tr.mean(0)
    _, _, vt = np.linalg.svd(f_tr - mean, full_matrices=False)
    basis = vt[:2]
    coords = (f_tr - mean) @ basis.T
    lo, hi = coords.min(0), coords.max(0)
    pad = 0.15 * (hi - lo + 1e-9)
    us = np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid)
    vs = np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid)
    uu, vv = np.meshgrid(us, vs)
    plane = mean + uu.reshape(-1, 1) * basis[0] + vv.reshape(-1, 1) * basis[1]
    out = {
        "coords": coords,
        "labels": y_tr,
        "regions": np.argmax(plane @ w.T + b, 1).reshape(grid, grid),
        "extent": [us[0], us[-1], vs[0], vs[-1]],
    }
    if morph.get("features") is not None and len(morph["features"]):
        out["path"] = (morph["features"][0] - mean) @ basis.T
        out["straight"] = (morph["straight"][0] - mean) @ basis.T
    return out


# --------------------------------------------------------------------------- figures


def _class_colors(num: int):
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    colors = (plt.cm.tab10.colors if num <= 10 else plt.cm.tab20.colors)[:num]
    return ListedColormap(colors), BoundaryNorm(np.arange(num + 1) - 0.5, num)


def plot_outside(outside: dict[str, dict[str, np.ndarray]]):
    """Per class and member: test points outside the training hull, pixels vs features."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(outside), 1, figsize=(7.5, 2.8 * len(outside)), squeeze=False)
    for ax, (name, o) in zip(axes[:, 0], outside.items(), strict=True):
        classes = np.arange(len(o["pixel"]))
        for k, (space, color) in enumerate((("pixel", "tab:blue"), ("feature", "tab:orange"))):
            label = f"{space} space (all classes: {float(o[f'{space}_overall']):.2f})"
            ax.bar(
                classes + 0.4 * (k - 0.5), np.nan_to_num(o[space]), 0.4, color=color, label=label
            )
        ax.set_xticks(classes)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("class (test points of the class vs the hull of its training points)")
        ax.set_ylabel("outside")
        ax.set_title(f"{name}: fraction of test points outside the training hull", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_distances(distances: dict[str, dict[str, np.ndarray]]):
    """Histograms of the test points' distances to the training hull (relative to its radius)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, space in zip(axes, ("pixel", "feature"), strict=True):
        for (name, d), color in zip(distances.items(), plt.cm.tab10.colors, strict=False):
            v = np.asarray(d[space])
            v = v[np.isfinite(v)]
            if v.size:
                ax.hist(
                    v,
                    bins=30,
                    histtype="step",
                    lw=1.6,
                    color=color,
                    label=f"{name} (median {np.median(v):.3f})",
                )
        ax.set_xlabel("distance to the training hull / radius of the training set")
        ax.set_ylabel("test points")
        ax.set_title(f"{space} space", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_projection(proj: dict[str, Any], title: str = ""):
    """Training features in the plane of their top two principal components: class
    regions of that plane (slice of the polyhedra), hulls of the projected classes, and
    the first morphing path against the straight one."""
    import matplotlib.pyplot as plt
    from scipy.spatial import ConvexHull, QhullError

    labels = np.asarray(proj["labels"])
    num = int(max(labels.max(), proj["regions"].max())) + 1
    cmap, norm = _class_colors(num)
    fig, ax = plt.subplots(figsize=(6.2, 5.0))
    ax.imshow(
        proj["regions"],
        origin="lower",
        extent=proj["extent"],
        aspect="auto",
        cmap=cmap,
        norm=norm,
        alpha=0.35,
        interpolation="nearest",
    )
    coords = np.asarray(proj["coords"])
    ax.scatter(coords[:, 0], coords[:, 1], c=labels, cmap=cmap, norm=norm, s=5, lw=0)
    for c in range(num):
        pts = coords[labels == c]
        if len(pts) < 3:
            continue
        try:
            hull = ConvexHull(pts)
        except QhullError:
            continue
        ring = np.append(hull.vertices, hull.vertices[0])
        ax.plot(pts[ring, 0], pts[ring, 1], color=cmap(c), lw=1.2)
    if "path" in proj:
        ax.plot(
            *np.asarray(proj["path"]).T, "k.-", lw=1.4, ms=4, label="features of the pixel path"
        )
        ax.plot(
            *np.asarray(proj["straight"]).T, "k--", lw=1.0, label="straight path in feature space"
        )
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(
        f"{title}: training features, class hulls (projected) and class regions (slice)", fontsize=8
    )
    fig.tight_layout()
    return fig


def plot_morphing(morph: dict[str, Any], title: str = ""):
    """Distance to the training hull along each morphing path: pixel path vs straight path,
    with the first boundary crossing of each."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 3.6))
    t = np.asarray(morph["t"])
    for k, (s, color) in enumerate(zip(morph["summary"], plt.cm.tab10.colors, strict=False)):
        kind = "same class" if s["same_class"] else "two classes"
        ax.plot(
            t,
            morph["hull_distance"][k],
            "-",
            color=color,
            label=f"{s['labels'][0]} -> {s['labels'][1]} ({kind})",
        )
        ax.plot(t, morph["straight_hull_distance"][k], "--", color=color)
        for tc, style in ((morph["crossing"][k], ":"), (morph["straight_crossing"][k], "-.")):
            if np.isfinite(tc):
                ax.axvline(float(tc), color=color, ls=style, lw=0.9)
    ax.set_xlabel("t (0: first image, 1: second)")
    ax.set_ylabel("distance to the training hull")
    ax.set_title(
        f"{title}: features of pixel interpolations (solid) vs the straight feature "
        "path (dashed); boundary crossings dotted / dash-dotted",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
