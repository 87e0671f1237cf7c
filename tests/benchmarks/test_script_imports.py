"""Every name that a benchmark or script imports from the package exists: they run outside the test suite
(``make bench``, docs commands), so a module moved under them would only show when someone runs them."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted(
    [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("benchmarks/peers/*.py"), *ROOT.glob("scripts/*.py")]
)


def _missing(path: Path) -> list[str]:
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm_attribution"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ModuleNotFoundError:
                    missing.append(f"{node.module}.{alias.name}")
    return missing


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_package_imports_exist(path: Path) -> None:
    assert _missing(path) == []
