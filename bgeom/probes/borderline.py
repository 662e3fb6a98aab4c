"""Suite probe "borderline": DeepDIG's borderline instances and what they say about the boundary.

Method: docs/borderline.md. For every model member and every class pair
``S-T`` of ``pairs`` (both directions), on the images as the model sees them:

1. DeepDIG (``bgeom.borderline.deepdig``): phase I and II generators trained
   through ``bgeom.train.train_loop`` and checkpointed under
   ``models/<model>/deepdig/<member>/`` (a re-run reuses them), phase II
   evaluated on held-out (test) images, phase III bisections;
2. the baselines RPBS (random pairs of correctly classified S and T test
   images) and EPBS (each S test image with its nearest T test image in
   embedding space), bisected the same way;
3. input-space complexity of the three sets of instances, and a linear SVM on
   the penultimate features of the S and T training images: its accuracy and
   normalised distances for training, test and borderline points;
4. distances to the pair's boundary (targeted DeepFool refined onto it) and
   principal curvatures at borderline instances, against those at the DeepFool
   boundary points of natural test images (``geometry_samples``; 0 skips it).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import numpy as np

from bgeom import borderline as bl
from bgeom import curvature, operators
from bgeom.boundary import boundary_point
from bgeom.probes import base
from bgeom.probes.base import Member, ProbeOptions, ProbeOutput, SuiteContext, option

METHODS = ("DeepDIG", "RPBS", "EPBS")
_PAIR = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_pair(text: str) -> tuple[int, int]:
    """``"3-8"`` -> ``(3, 8)``; raises ``ValueError`` with what to write."""
    match = _PAIR.match(text)
    if not match or match.group(1) == match.group(2):
        raise ValueError(
            "borderline probe: each entry of pairs is 'S-T', two different class indices, "
            f"e.g. '3-8'; got {text!r}."
        )
    return int(match.group(1)), int(match.group(2))


@dataclasses.dataclass(frozen=True)
class BorderlineOptions(ProbeOptions):
    """Options of the borderline probe (docs/borderline.md)."""

    pairs: tuple[str, ...] = option(
        ("3-8", "4-9"), "class pairs 'S-T', each searched in both directions"
    )
    steps: int = option(1000, "generator optimiser steps per phase (reference: 5000)", ge=1)
    batch_size: int = option(128, "generator batch per pair and step (reference: 128)", ge=1)
    learning_rate: float = option(0.01, "generators' initial Adam learning rate", gt=0)
    decay_every: int = option(
        1000, "step decay: the rate is multiplied by decay_rate this often", ge=1
    )
    decay_rate: float = option(0.95, "step decay factor", gt=0, le=1)
    alpha: float = option(0.8, "weight of the target term of the generator loss", ge=0)
    architecture: str = option(
        "auto",
        "generator: dense, conv, or auto (dense up to 1024 input values)",
        choices=bl.ARCHITECTURES,
    )
    tol: float = option(1e-4, "bisection tolerance on |p_s - p_t|", gt=0, le=1)
    max_halvings: int = option(60, "most bisection midpoints per segment", ge=1)
    partners: int = option(50, "complexity: random partner instances per instance", ge=1)
    points: int = option(50, "complexity: points per segment", ge=2)
    geometry_samples: int = option(
        32,
        "borderline instances per direction and natural test images per pair for the "
        "boundary distance and curvature comparison (0: skip it)",
        ge=0,
    )
    k: int = option(6, "principal curvatures per point (half largest, half smallest)", ge=2)
    examples: int = option(4, "borderline instances drawn per direction in the figure", ge=0)
    seed: int = option(0, "seed of the generators, the complexity partners and the RPBS pairing")

    def __post_init__(self):
        for text in self.pairs:
            parse_pair(text)


class _Searched(NamedTuple):
    """One set of searched segments: its ends and bisections (NumPy)."""

    a: np.ndarray
    b: np.ndarray
    search: bl.BorderlineResult

    @property
    def instances(self) -> np.ndarray:
        return self.search.point[self.search.converged]


@base.register_probe("borderline", BorderlineOptions)
def borderline_probe(
    ctx: SuiteContext, opts: BorderlineOptions, *, probe_id: str, models: tuple[str, ...]
) -> ProbeOutput:
    """Borderline instances (DeepDIG, RPBS, EPBS): yields, input complexity, embedding linearity."""
    from bgeom.sharding import process_info

    out = ProbeOutput(summary={})
    class_pairs = [parse_pair(p) for p in opts.pairs]
    checkpoints = process_info().count == 1
    for member in ctx.all_members(models):
        num_classes = ctx.model_dataset(member.model).num_classes
        bl.check_class_pairs(class_pairs, num_classes, f"borderline probe (model {member.model})")
        if member.features_fn is None:
            raise ValueError(
                f"borderline probe: model {member.model} has no penultimate features "
                "(features_fn); the embedding linearity needs them."
            )
        _analyse_member(ctx, opts, member, class_pairs, checkpoints, out)
    if not checkpoints:
        out.notes.append(
            "A multi-process run trains the generators on every process without checkpoints "
            "(deterministic, so every process gets the same ones)."
        )
    out.notes.append(
        "DeepDIG's phase II is evaluated on held-out adversarial images (phase I applied to "
        "the test images), which its generator never saw; phase2_train_yield is the figure on "
        "its own training set, the one the reference code reports. RPBS and EPBS pair "
        "correctly classified test images; EPBS pairs each S image with its nearest T image "
        "in embedding space (the reference code's norm without an axis pairs every S image "
        "with the first T image). Borderline points are labelled by the model's own label "
        "for the SVM accuracy."
    )
    return out


def _config(opts: BorderlineOptions) -> bl.GeneratorConfig:
    return bl.GeneratorConfig(
        steps=opts.steps,
        batch_size=opts.batch_size,
        learning_rate=opts.learning_rate,
        decay_every=opts.decay_every,
        decay_rate=opts.decay_rate,
        alpha=opts.alpha,
        architecture=opts.architecture,
        seed=opts.seed,
    )


def _analyse_member(ctx, opts, member: Member, class_pairs, checkpoints: bool, out) -> None:
    """Summary rows, arrays and figures of one member."""
    x_train, y_train = ctx.train_inputs(member.model)
    x_test, y_test = ctx.test_inputs(member.model)
    directed = [d for s, t in class_pairs for d in ((s, t), (t, s))]
    folder = ctx.out / "models" / member.model / "deepdig" / member.name if checkpoints else None
    dd = bl.deepdig(
        member.apply_fn,
        member.params,
        x_train,
        y_train,
        x_test,
        y_test,
        directed,
        config=_config(opts),
        tol=opts.tol,
        max_halvings=opts.max_halvings,
        checkpoint_dir=folder,
        progress=ctx.progress,
        map_fn=ctx.map,
    )
    labels = bl.predict(member.apply_fn, member.params, x_test, map_fn=ctx.map)
    baselines = _baselines(ctx, opts, member, class_pairs, x_test, y_test, labels)
    sets = {}  # (pair, label) -> _Searched
    for c, (s, t) in enumerate(class_pairs):
        for p in dd.pairs[2 * c : 2 * c + 2]:
            sets[f"{s}-{t}", f"{p.source}->{p.target}"] = _Searched(
                p.adversarial, p.reflected, p.search
            )
        sets[f"{s}-{t}", "RPBS"], sets[f"{s}-{t}", "EPBS"] = baselines[c]
    key = jax.random.PRNGKey(opts.seed)
    complexity = dict(
        zip(
            sets,
            bl.input_complexities(
                [jax.random.fold_in(key, i) for i in range(len(sets))],
                member.apply_fn,
                member.params,
                [searched.instances for searched in sets.values()],
                partners=opts.partners,
                num_points=opts.points,
                map_fn=ctx.map,
            ),
            strict=True,
        )
    )
    geometry = _geometry(ctx, opts, member, class_pairs, (x_test, y_test, labels), sets)
    name = member.name
    histograms, bars = {}, {}
    for c, (s, t) in enumerate(class_pairs):
        pair = f"{s}-{t}"
        here = {label: searched for (q, label), searched in sets.items() if q == pair}
        linearity = _linearity(ctx, member, (s, t), (x_train, y_train, x_test, y_test), here)
        for phase in dd.pairs[2 * c : 2 * c + 2]:
            label = f"{phase.source}->{phase.target}"
            out.summary[f"{name}/{label}"] = {
                "method": "DeepDIG",
                "phase1_train_yield": phase.phase1_train_yield,
                "phase1_test_yield": phase.phase1_test_yield,
                "phase2_train_yield": phase.phase2_train_yield,
                "phase2_yield": phase.phase2_yield,
                **_search_summary(phase.search),
                "complexity": complexity[pair, label].mean,
                **_svm_row(linearity, label),
                **geometry.get((pair, label), {}),
            }
        for method in ("RPBS", "EPBS"):
            out.summary[f"{name}/{pair} {method}"] = {
                "method": method,
                **_search_summary(here[method].search),
                "complexity": complexity[pair, method].mean,
                **_svm_row(linearity, method),
                **geometry.get((pair, method), {}),
            }
        out.summary[f"{name}/{pair} train images"] = {
            "method": "train images",
            **_svm_row(linearity, "train"),
        }
        # The same bar names for every pair: the directions as S->T and T->S.
        generic = {f"{s}->{t}": "DeepDIG S->T", f"{t}->{s}": "DeepDIG T->S"}
        bars[pair] = {
            "complexity": {generic.get(k, k): complexity[pair, k].mean for k in here},
            "distance": {generic.get(k, k): v for k, v in linearity.distance.items()},
            "svm_test_accuracy": linearity.accuracy["test"],
        }
        histograms[pair] = linearity.signed
        out.summary[f"{name}/{pair} test images"] = {
            "method": "test images",
            **_svm_row(linearity, "test"),
            **geometry.get((pair, "natural"), {}),
            "svm_converged": linearity.converged,
            "bars": bars[pair],
            "signed_distances": {label: d.tolist() for label, d in linearity.signed.items()},
        }
        for label, searched in here.items():
            prefix = f"{name}/{pair}/{label}"
            out.arrays[f"{prefix}/a"] = searched.a
            out.arrays[f"{prefix}/b"] = searched.b
            for field in ("point", "status", "halvings", "gap", "converged"):
                out.arrays[f"{prefix}/{field}"] = np.asarray(getattr(searched.search, field))
            out.arrays[f"{prefix}/complexity"] = complexity[pair, label].complexity
        for label, d in linearity.signed.items():
            out.arrays[f"{name}/{pair}/signed_distance/{label}"] = d
    out.figures[f"instances-{name}"] = plot_instances(dd, opts.examples, title=name)
    out.figures[f"characteristics-{name}"] = plot_characteristics(bars, title=name)
    out.figures[f"svm-{name}"] = plot_signed_distances(histograms, title=name)
    for i, generators in enumerate((dd.phase1, dd.phase2)):
        for metric, values in (generators.history if generators else {}).items():
            out.arrays[f"{name}/generators/phase{i + 1}/{metric}"] = values


def _baselines(ctx, opts, member, class_pairs, x_test, y_test, labels) -> list[tuple]:
    """(RPBS, EPBS) ``_Searched`` of every class pair, bisected in one call."""
    ends = []
    for c, (s, t) in enumerate(class_pairs):
        rp = bl.random_pairs(
            jax.random.fold_in(jax.random.PRNGKey(opts.seed + 1), c),
            member.apply_fn,
            member.params,
            x_test,
            y_test,
            s,
            t,
            labels=labels,
            map_fn=ctx.map,
        )
        ep = bl.embedding_nearest_pairs(
            member.apply_fn,
            member.features_fn,
            member.params,
            x_test,
            y_test,
            s,
            t,
            labels=labels,
            map_fn=ctx.map,
        )
        ends += [rp, ep]
    found = bl.borderline_searches(
        member.apply_fn,
        member.params,
        np.concatenate([e.a for e in ends]),
        np.concatenate([e.b for e in ends]),
        tol=opts.tol,
        max_halvings=opts.max_halvings,
        map_fn=ctx.map,
    )
    results = bl.split_results(found, [len(e.a) for e in ends])
    searched = [_Searched(e.a, e.b, r) for e, r in zip(ends, results, strict=True)]
    return [(searched[2 * c], searched[2 * c + 1]) for c in range(len(class_pairs))]


def _search_summary(search: bl.BorderlineResult) -> dict[str, Any]:
    """Success rate and attempts (halvings) of a set of bisections, as the reference reports."""
    ok = np.asarray(search.converged, bool)
    halvings = np.asarray(search.halvings)
    status = np.asarray(search.status)
    return {
        "searched": int(ok.size),
        "instances": int(ok.sum()),
        "success_rate": base.fraction(ok),
        "attempts": base.mean(halvings),
        "attempts_success": base.mean(halvings[ok]),
        "attempts_fail": base.mean(halvings[~ok]),
        "statuses": {n: int(np.sum(status == i)) for i, n in enumerate(bl.STATUS_NAMES)},
        "max_gap": float(np.max(search.gap[ok])) if ok.any() else None,
    }


def _linearity(ctx, member, pair, data, sets) -> bl.Linearity:
    """The SVM on the S and T training features, measured on test and borderline points."""
    s, t = pair
    x_train, y_train, x_test, y_test = data
    feats = lambda x: bl.features(member.features_fn, member.params, x, map_fn=ctx.map)
    test = np.flatnonzero((y_test == s) | (y_test == t))
    evaluate = {"test": (feats(x_test[test]), y_test[test])}
    for label, searched in sets.items():
        points = searched.instances
        own = bl.predict(member.apply_fn, member.params, points, map_fn=ctx.map)
        evaluate[label] = (feats(points), own)
    return bl.embedding_linearity(
        feats(x_train[y_train == s]),
        feats(x_train[y_train == t]),
        evaluate,
        source=s,
        target=t,
    )


def _svm_row(linearity: bl.Linearity, label: str) -> dict[str, Any]:
    return {
        "svm_accuracy": linearity.accuracy.get(label),
        "svm_distance": linearity.distance.get(label),
    }


def _geometry(ctx, opts, member, class_pairs, test, sets) -> dict[tuple[str, str], dict]:
    """Distances to the pair's boundary and principal curvatures there, borderline vs natural.

    Every point (the first ``geometry_samples`` correctly classified S and T
    test images of a pair, and as many instances of each set) goes through
    ``boundary_point`` with the pair's other class as target: targeted
    DeepFool's point refined onto the S/T boundary, and its distance (tiny for
    a borderline instance, which is on it already). The principal curvatures
    (``principal_curvatures``, the k/2 largest and smallest) of
    ``F = f_label - f_other`` are taken at the natural images' boundary points
    and at the instances themselves: exact Hessian-vector products for a
    smooth net, finite differences at one scale h = 0.1 x the median natural
    distance for a piecewise-linear one (a point flat at that scale is left
    out). Two mapped calls per member, every pair at once.
    """
    n = opts.geometry_samples
    if n == 0:
        return {}
    x_test, y_test, labels = test
    groups, own = {}, {}
    for s, t in class_pairs:
        pair = f"{s}-{t}"
        natural = np.flatnonzero(((y_test == s) | (y_test == t)) & (labels == y_test))[:n]
        if len(natural):
            groups[pair, "natural"], own[pair, "natural"] = x_test[natural], labels[natural]
        for key, searched in sets.items():
            if key[0] == pair and len(searched.instances):
                groups[key] = searched.instances[:n]
    if not any(label == "natural" for _, label in groups):
        return {}
    apply_fn, params = member.apply_fn, member.params
    keys, sizes = list(groups), [len(v) for v in groups.values()]
    part = lambda v: dict(zip(keys, bl.split_rows(v, sizes), strict=True))
    joined = np.concatenate(list(groups.values()))
    borderline = [key for key in keys if key[1] != "natural"]
    if borderline:
        found = bl.predict(
            apply_fn, params, np.concatenate([groups[k] for k in borderline]), map_fn=ctx.map
        )
        own.update(
            zip(borderline, bl.split_rows(found, [len(groups[k]) for k in borderline]), strict=True)
        )
    pair_of = {key: tuple(int(c) for c in key[0].split("-")) for key in keys}
    other = {k: np.where(own[k] == pair_of[k][0], pair_of[k][1], pair_of[k][0]) for k in keys}
    bp = ctx.map(
        lambda p, xi, ti: boundary_point(apply_fn, p, xi, target=ti),
        params,
        joined,
        np.concatenate([other[k] for k in keys]).astype(np.int32),
        in_axes=(None, 0, 0),
        desc=f"boundary points {member.name}",
    )
    point, distance, reached = part(bp.point), part(bp.distance), part(bp.converged)
    operator = operators.resolve_operator("auto", apply_fn, params, joined[0], "borderline probe")
    near = np.concatenate([distance[k][reached[k]] for k in keys if k[1] == "natural"])
    h = None
    if operator == "fd":
        h = float(operators.DEFAULT_FD_SCALE * np.median(near)) if near.size else None
        if not h:
            return {k: {"boundary_distance_median": base.median(distance[k])} for k in keys}
    curv = ctx.map(
        lambda p, zi, a, b: curvature.principal_curvatures(
            apply_fn, p, zi, a, b, k=opts.k, which="both", operator=operator, h=h
        ),
        params,
        np.concatenate([point[k] if k[1] == "natural" else groups[k] for k in keys]),
        np.concatenate([own[k] for k in keys]).astype(np.int32),
        np.concatenate([other[k] for k in keys]).astype(np.int32),
        in_axes=(None, 0, 0, 0),
        desc=f"curvature {member.name}",
    )
    kappa, ok = part(curv.curvatures), part(curv.converged)
    rows = {}
    for key in keys:
        use = ok[key] & (reached[key] if key[1] == "natural" else True)
        values = np.asarray(kappa[key], np.float64)[use]
        some = len(values) > 0
        rows[key] = {
            "boundary_distance_median": base.median(distance[key]),
            "curvature_points": int(len(values)),
            "max_abs_curvature_median": base.median(np.abs(values).max(1)) if some else None,
            "largest_curvature_median": base.median(values[:, 0]) if some else None,
            "smallest_curvature_median": base.median(values[:, -1]) if some else None,
        }
        if key[1] == "natural":
            rows[key].update(curvature_operator=operator, fd_scale=h)
    return rows


# ------------------------------------------------------------------ figures


def plot_instances(dd: bl.DeepDIGResult, examples: int, title: str = "") -> Any:
    """Borderline instances between their two ends: (a, instance, G2(a)) per direction."""
    from bgeom import report

    plt = report.plt
    cols = [p for p in dd.pairs if len(p.instances)]
    rows = max(min(examples, max((len(p.instances) for p in cols), default=0)), 1)
    fig, axes = plt.subplots(
        rows,
        3 * max(len(cols), 1),
        figsize=(1.1 * 3 * max(len(cols), 1), 1.25 * rows + 0.6),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.axis("off")
    for j, p in enumerate(cols):
        ok = np.flatnonzero(p.search.converged)[:rows]
        for i, idx in enumerate(ok):
            trio = (p.adversarial[idx], p.search.point[idx], p.reflected[idx])
            names = (f"a: {p.target}", "borderline", f"G2(a): {p.source}")
            for m, (img, label) in enumerate(zip(trio, names, strict=True)):
                ax = axes[i, 3 * j + m]
                ax.axis("on")
                report._image(ax, np.clip(img, 0, 1), vmin=0, vmax=1)
                if i == 0:
                    ax.set_title(
                        f"{p.source}->{p.target}\n{label}" if m == 1 else label, fontsize=7
                    )
    fig.suptitle(f"DeepDIG borderline instances between their ends: {title}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_characteristics(bars: dict[str, dict[str, Any]], title: str = "") -> Any:
    """Input-space complexity and SVM distances per class pair and method."""
    from bgeom import report

    plt = report.plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    pairs = list(bars)
    for ax, what, ylabel in (
        (left, "complexity", "label changes / points"),
        (right, "distance", "mean |d| / (1 + mean |d|)"),
    ):
        labels = list(dict.fromkeys(lab for p in pairs for lab in bars[p][what]))
        width = 0.8 / max(len(labels), 1)
        for j, (lab, color) in enumerate(zip(labels, plt.cm.tab10.colors, strict=False)):
            values = [bars[p][what].get(lab) for p in pairs]
            xs = np.arange(len(pairs)) - 0.4 + width * (j + 0.5)
            ax.bar(xs, [np.nan if v is None else v for v in values], width, color=color, label=lab)
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels(
            [
                f"{p}\n(SVM test acc {bars[p]['svm_test_accuracy']:.3f})"
                if what == "distance"
                else p
                for p in pairs
            ],
            fontsize=8,
        )
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    left.set_title("Input-space complexity of the instances", fontsize=9)
    right.set_title("Distance to the SVM hyperplane in embedding space", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_signed_distances(histograms: dict[str, dict[str, np.ndarray]], title: str = "") -> Any:
    """Histograms of the signed distances d to the SVM hyperplane, one panel per class pair."""
    from bgeom import report

    plt = report.plt
    fig, axes = plt.subplots(
        1, max(len(histograms), 1), figsize=(4.6 * max(len(histograms), 1), 3.2), squeeze=False
    )
    for ax, (pair, signed) in zip(axes[0], histograms.items(), strict=False):
        values = [d for d in signed.values() if len(d)]
        lo = min((float(d.min()) for d in values), default=-1.0)
        hi = max((float(d.max()) for d in values), default=1.0)
        bins = np.linspace(lo, hi, 40) if hi > lo else 40
        for (label, d), color in zip(signed.items(), plt.cm.tab10.colors, strict=False):
            if len(d):
                ax.hist(
                    d,
                    bins=bins,
                    histtype="step",
                    lw=1.5,
                    density=True,
                    color=color,
                    label=f"{label} (n={len(d)})",
                )
        s, t = pair.split("-")
        ax.set_xlabel(f"signed distance d ({s} < 0 < {t})")
        ax.set_title(pair, fontsize=9)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("density")
    fig.suptitle(f"Distances to the SVM hyperplane in embedding space: {title}", fontsize=9)
    fig.tight_layout()
    return fig
