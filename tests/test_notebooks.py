"""Every notebook in notebooks/ runs top to bottom at toy size, and its pair is in sync.

Notebooks are jupytext pairs: ``notebooks/<name>.py`` (percent format, the
source of truth, reviewed in diffs) and ``notebooks/<name>.ipynb`` (with
outputs, for reading on GitHub). With ``BGEOM_NOTEBOOK_TOY=1`` a notebook
shrinks its data and iteration counts so the whole set runs in CI.
"""

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_toy_size(path, tmp_path, monkeypatch):
    monkeypatch.setenv("BGEOM_NOTEBOOK_TOY", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_pair_in_sync(path):
    paired = path.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} is missing: run `make notebooks`."
    source = [c.source for c in jupytext.read(path).cells]
    shown = [c.source for c in jupytext.read(paired).cells]
    assert source == shown, f"{paired.name} is out of date with {path.name}: run `make notebooks`."
