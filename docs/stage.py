"""Stage the documentation site's sources for mkdocs (``make docs`` runs this first).

mkdocs reads one folder. This copies into it the method pages (docs/*.md and their
figures), BENCHMARKS.md, and the executed notebooks (notebooks/*.ipynb, rendered with
their outputs by mkdocs-jupyter), and rewrites the pages' links to ../BENCHMARKS.md to
the staged copy. Nothing in docs/ is changed.

Usage::

    python docs/stage.py [OUT]     # default: build/docs-src (mkdocs.yml's docs_dir)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# MathJax reads the $...$ and $$...$$ spans that pymdownx.arithmatex (generic mode) marks.
MATHJAX = """window.MathJax = {
  tex: {inlineMath: [["\\\\(", "\\\\)"]], displayMath: [["\\\\[", "\\\\]"]],
        processEscapes: true, processEnvironments: true},
  options: {ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex"}
};
"""


def stage(out: Path) -> Path:
    """Write the site's sources to ``out`` (emptied first); return it."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in sorted((ROOT / "docs").iterdir()):
        if path.suffix == ".md":
            text = path.read_text().replace("](../BENCHMARKS.md)", "](BENCHMARKS.md)")
            (out / path.name).write_text(text)
        elif path.suffix in (".png", ".svg"):
            shutil.copy(path, out / path.name)
    shutil.copy(ROOT / "BENCHMARKS.md", out / "BENCHMARKS.md")
    (out / "notebooks").mkdir()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copy(notebook, out / "notebooks" / notebook.name)
    (out / "javascripts").mkdir()
    (out / "javascripts" / "mathjax.js").write_text(MATHJAX)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "docs-src"
    print(f"staged the documentation sources in {stage(target)}")
