"""Plots and the self-contained HTML report of a suite run folder."""

from __future__ import annotations

import base64
import datetime
import html
import json
import platform
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _image(ax: Any, img: np.ndarray, **kwargs: Any) -> None:
    img = np.asarray(img)
    if img.shape[-1] == 1:
        img = img[..., 0]
        kwargs.setdefault("cmap", "gray")
    ax.imshow(img, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_margin_distribution(margins: dict[str, np.ndarray]) -> plt.Figure:
    """Histogram of the (converged) margins of each model, with the medians marked."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    finite = [m[np.isfinite(m)] for m in margins.values() if np.size(m)]
    top = max((float(np.quantile(m, 0.99)) for m in finite if m.size), default=1.0)
    bins = np.linspace(0.0, top * 1.05 if top > 0 else 1.0, 40)
    for (name, m), color in zip(margins.items(), plt.cm.tab10.colors, strict=False):
        m = np.asarray(m)
        m = m[np.isfinite(m)]
        if not m.size:
            continue
        med = float(np.median(m))
        label = f"{name} (median {med:.3g}, n={m.size})"
        ax.hist(m, bins=bins, histtype="step", lw=1.8, color=color, label=label)
        ax.axvline(med, color=color, ls="--", lw=1)
    ax.set_xlabel("margin ||r||_2 (DeepFool)")
    ax.set_ylabel("samples")
    ax.set_title("Distribution of margins (dashed: median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_margin_per_class(
    per_class: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int
) -> plt.Figure:
    """Box plots of the margins per predicted class, one colour per model."""
    fig, ax = plt.subplots(
        figsize=(min(12.0, 2.0 + 0.35 * num_classes * max(len(per_class), 1)), 3.6)
    )
    width = 0.8 / max(len(per_class), 1)
    handles = []
    for j, ((name, (m, lab)), color) in enumerate(
        zip(per_class.items(), plt.cm.tab10.colors, strict=False)
    ):
        m, lab = np.asarray(m), np.asarray(lab)
        groups = [m[lab == c] for c in range(num_classes)]
        positions = [c - 0.4 + width * (j + 0.5) for c in range(num_classes)]
        keep = [i for i, g in enumerate(groups) if g.size]
        if not keep:
            continue
        bp = ax.boxplot(
            [groups[i] for i in keep],
            positions=[positions[i] for i in keep],
            widths=width * 0.9,
            patch_artist=True,
            showfliers=False,
            manage_ticks=False,
        )
        for box in bp["boxes"]:
            box.set_facecolor(color)
            box.set_alpha(0.6)
        handles.append(plt.Rectangle((0, 0), 1, 1, color=color, alpha=0.6, label=name))
    ax.set_xticks(range(num_classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("margin")
    ax.set_title("Margin per class")
    if handles:
        ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    return fig


def plot_perturbations(examples: dict[str, np.ndarray], title: str = "") -> plt.Figure:
    """Rows of (image, perturbation, perturbed image) with labels and margins.

    The perturbation is shown on a symmetric diverging scale (red +, blue -)
    normalised per row, so its structure is visible whatever its size.
    """
    x = np.asarray(examples["x"])
    r = np.asarray(examples["perturbation"])
    k = len(x)
    fig, axes = plt.subplots(k, 3, figsize=(5.4, 1.8 * k + 0.4), squeeze=False)
    for i in range(k):
        _image(axes[i, 0], np.clip(x[i], 0, 1), vmin=0, vmax=1)
        rr = r[i].mean(-1) if r[i].shape[-1] > 1 else r[i][..., 0]
        lim = float(np.max(np.abs(rr))) or 1.0
        axes[i, 1].imshow(rr, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[i, 1].set_xticks([])
        axes[i, 1].set_yticks([])
        _image(axes[i, 2], np.clip(x[i] + r[i], 0, 1), vmin=0, vmax=1)
        axes[i, 0].set_ylabel(f"label {int(examples['label'][i])}", fontsize=8)
        axes[i, 1].set_title(f"||r|| = {float(examples['margin'][i]):.3f}", fontsize=8)
        axes[i, 2].set_title(f"x + r -> {int(examples['adv_label'][i])}", fontsize=8)
    fig.suptitle(f"Minimal perturbations: {title}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_training_curves(histories: dict[str, dict[str, list]]) -> plt.Figure:
    """Training loss and test accuracy per epoch for each model (mean over members)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for (name, h), color in zip(histories.items(), plt.cm.tab10.colors, strict=False):
        loss = np.nanmean(np.asarray(h["loss"], float), axis=1)
        acc = np.nanmean(np.asarray(h["test_accuracy"], float), axis=1)
        epochs = np.arange(1, len(loss) + 1)
        ax1.plot(epochs, loss, color=color, label=name)
        ax2.plot(epochs, acc, color=color, label=name)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ the report

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em;display:block;overflow-x:auto;
max-width:100%}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right} th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;margin:.4em 0;border:1px solid #eee}
.meta{color:#666;font-size:.9em}
.note{background:#fff8e1;padding:.4em .8em;border-left:3px solid #f0b400}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
.toc{columns:2;font-size:.95em}
"""


def _is_scalar(v: Any) -> bool:
    """What a table cell may hold: a number, a string, a bool or None (never a list)."""
    return v is None or isinstance(v, bool | int | float | str)


def _fmt(v: Any) -> str:
    """One table cell; only scalars reach here (lists stay in the JSON, NPZ and plots)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _anchor(name: str, taken: set[str]) -> str:
    """A unique HTML id for a section titled ``name``."""
    base = "probe-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "probe")
    anchor, i = base, 1
    while anchor in taken:
        i += 1
        anchor = f"{base}-{i}"
    taken.add(anchor)
    return anchor


def _embed(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _summary_table(summary: dict[str, Any]) -> str:
    """Rows: models (or other keys); columns: their scalar statistics.

    A column holds a statistic that is a scalar (or missing) in every row;
    lists and nested tables are left to the JSON block and the plots.
    """
    rows = {k: v for k, v in summary.items() if isinstance(v, dict)}
    parts = []
    if rows:
        cols: list[str] = []
        for v in rows.values():
            for c in v:
                if c not in cols and all(_is_scalar(r.get(c)) for r in rows.values()):
                    cols.append(c)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            f"<tr><td>{html.escape(k)}</td>"
            + "".join(f"<td>{_fmt(v.get(c))}</td>" for c in cols)
            + "</tr>"
            for k, v in rows.items()
        )
        if cols:
            parts.append(f"<table><tr><th></th>{head}</tr>{body}</table>")
    scalars = {k: v for k, v in summary.items() if _is_scalar(v)}
    if scalars:
        parts.append(
            "<table>"
            + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in scalars.items()
            )
            + "</table>"
        )
    return "\n".join(parts)


def _accuracy(values: list[float]) -> float | str:
    """Test accuracy of a model for a table cell: the number, or one per ensemble member."""
    return values[0] if len(values) == 1 else ", ".join(f"{a:.4g}" for a in values)


def write_report(out: str | Path) -> Path:
    """Write ``report.html`` for the run folder ``out`` from its saved results.

    A table of contents links the models, every probe's section and the
    config; tables hold scalars, the lists behind the plots stay in each
    section's JSON block (and in ``results/``).
    """
    import jax

    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    parts = [
        f"<h1>bgeom suite: {html.escape(config['name'])}</h1>",
        f"<p class=meta>{datetime.datetime.now().isoformat(timespec='seconds')} - "
        f"jax {jax.__version__} on {html.escape(jax.devices()[0].platform)} "
        f"({jax.device_count()} device(s)), Python {platform.python_version()}, "
        f"{html.escape(platform.machine())}</p>",
    ]
    anchors: set[str] = set()
    probe_anchors = [_anchor(spec["id"], anchors) for spec in config["probes"]]
    toc = "".join(
        f'<li><a href="#{a}">Probe: {html.escape(spec["id"])}</a></li>'
        for spec, a in zip(config["probes"], probe_anchors, strict=True)
    )
    parts.append(
        '<nav><ul class=toc><li><a href="#models">Models</a></li>'
        f'{toc}<li><a href="#config">Config</a></li></ul></nav>'
    )
    parts += _models_section(out, config)
    for spec, anchor in zip(config["probes"], probe_anchors, strict=True):
        parts += _probe_section(out, spec, anchor)
    parts.append(
        '<h2 id="config">Config</h2><pre>' + html.escape(json.dumps(config, indent=1)) + "</pre>"
    )
    page = (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>bgeom: {html.escape(config['name'])}</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    return path


def _models_section(out: Path, config: dict[str, Any]) -> list[str]:
    """The models table (one row per model) and the training curves."""
    parts = ['<h2 id="models">Models</h2>']
    model_summaries = {}
    for key in config["models"]:
        path = out / "models" / key / "summary.json"
        if path.exists():
            model_summaries[key] = json.loads(path.read_text())
    if not model_summaries:
        return parts
    rows = {}
    for key, s in model_summaries.items():
        spec = s["spec"]
        seeds = spec["seeds"]
        rows[key] = {
            "model": spec["model"],
            "activation": spec["activation"]
            + (f" (beta {spec['beta']})" if spec["activation"] == "softplus" else ""),
            "dataset": spec["dataset"],
            "seeds": seeds if isinstance(seeds, int) else ", ".join(str(x) for x in seeds),
            "recipe": spec["train"].get("recipe", "default"),
            "test accuracy": _accuracy(s["test_accuracy"]),
        }
    parts.append(_summary_table(rows))
    fig = plot_training_curves({k: s["history"] for k, s in model_summaries.items()})
    curve = out / "plots" / "training.png"
    fig.savefig(curve, dpi=110, bbox_inches="tight")
    plt.close(fig)
    parts.append(_embed(curve))
    return parts


def _probe_section(out: Path, spec: dict[str, Any], anchor: str) -> list[str]:
    """One probe's section: description, notes, scalar table, figures, all numbers as JSON."""
    path = out / "results" / f"{spec['id']}.json"
    parts = [f'<h2 id="{anchor}">Probe: {html.escape(spec["id"])}</h2>']
    if not path.exists():
        return parts + ["<p class=note>Not run yet.</p>"]
    result = json.loads(path.read_text())
    parts.append(
        f"<p>{html.escape(result.get('description', ''))} "
        f"<span class=meta>({result['seconds']} s)</span></p>"
    )
    for note in result.get("notes", []):
        parts.append(f"<p class=note>{html.escape(note)}</p>")
    parts.append(_summary_table(result["summary"]))
    for fig_file in result.get("figures", {}).values():
        fig_path = out / "plots" / fig_file
        if fig_path.exists():
            parts.append(_embed(fig_path))
    parts.append(
        "<details><summary>All numbers (JSON)</summary><pre>"
        + html.escape(json.dumps(result["summary"], indent=1))
        + "</pre></details>"
    )
    return parts
