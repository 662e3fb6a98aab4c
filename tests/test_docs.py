"""The documentation site builds in strict mode (any warning fails it: a broken link, a
docstring mkdocstrings cannot read, a missing page), with the API reference generated from
the docstrings and the notebooks rendered with their outputs."""

import sys
from pathlib import Path

import pytest

mkdocs_config = pytest.importorskip("mkdocs.config")
from mkdocs.commands import build  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import stage  # noqa: E402


def test_site_builds_strictly_with_api_reference_and_notebooks(tmp_path):
    source = stage.stage(tmp_path / "src")
    config = mkdocs_config.load_config(
        str(ROOT / "mkdocs.yml"), docs_dir=str(source), site_dir=str(tmp_path / "site")
    )
    assert config["strict"]
    build.build(config)  # raises mkdocs.exceptions.Abort on any warning (strict)
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text()
    for name in ("boundary_curvature", "from_linen", "sparsefool", "hull_distance", "prime"):
        assert name in api, name
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        page = (site / "notebooks" / notebook.stem / "index.html").read_text()
        assert "data:image/png" in page, notebook.name  # rendered with its figures
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "index.md":
            assert (site / page.stem / "index.html").exists(), page.name
