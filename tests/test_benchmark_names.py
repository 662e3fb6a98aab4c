"""The benchmark scripts name bgeom functions that exist.

The scripts are not run in CI (they time peers for minutes), so an API move
can break them unseen, as it once broke bench_curvature.py. This reads every
``bgeom.a.b`` chain in benchmarks/*.py (also through ``import_bgeom()`` and
simple aliases such as ``curv = bgeom.curvature``) and resolves it.
"""

import ast
from pathlib import Path

import pytest

import bgeom

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def _chain(node: ast.AST, aliases: dict[str, list[str]]) -> list[str] | None:
    """``['train', 'fit']`` for ``bgeom.train.fit``; None when not rooted at bgeom."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "import_bgeom":
        return names[::-1]
    if isinstance(node, ast.Name):
        if node.id == "bgeom":
            return names[::-1]
        if node.id in aliases:
            return aliases[node.id] + names[::-1]
    return None


def _chains(path: Path) -> list[tuple[int, list[str]]]:
    tree = ast.parse(path.read_text())
    aliases: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            chain = _chain(node.value, {})
            if isinstance(target, ast.Name) and chain:
                aliases[target.id] = chain
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = _chain(node, aliases)
            if chain:
                found.append((node.lineno, chain))
    return found


def test_the_checker_sees_the_scripts_chains():
    chains = {tuple(c) for path in SCRIPTS for _, c in _chains(path)}
    assert ("batched",) in chains and ("engine", "default_batch_size") in chains


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_bgeom_name_a_benchmark_uses_exists(path):
    missing = []
    for line, chain in _chains(path):
        obj = bgeom
        for i, name in enumerate(chain):
            if not hasattr(obj, name):
                missing.append(f"{path.name}:{line}: bgeom.{'.'.join(chain[: i + 1])}")
                break
            obj = getattr(obj, name)
    assert not missing, "names the benchmarks use that bgeom lacks:\n" + "\n".join(missing)
