"""scripts/compare_cells.py: the rescored methods' shifts are the differences of the per-test means, and a
method that was not rescored but changed fails the comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scripts.compare_cells import CellError, compare_cell, main


def _methods(kfac_coverage: list[float], less_coverage: list[float]) -> dict[str, Any]:
    def entry(coverage: list[float]) -> dict[str, Any]:
        return {"values": {"accuracy": [1.0, 0.0, 1.0, 1.0], "coverage": coverage}, "notes": {}}

    return {"kfac": entry(kfac_coverage), "less": entry(less_coverage)}


OLD = _methods([0.5, 0.5, 0.25, 1.0], [0.75, 0.5, 0.5, 0.25])


def _grid(root: Path, methods: dict[str, Any]) -> Path:
    for cell in ("grammars/seed-0", "grammars/seed-1"):
        (root / cell).mkdir(parents=True)
        (root / cell / "cell.json").write_text(json.dumps({"methods": methods}))
    return root


def test_the_shift_is_the_change_of_the_mean_and_others_must_be_identical() -> None:
    new = _methods([0.75, 0.5, 0.25, 0.5], OLD["less"]["values"]["coverage"])
    shifts, differences = compare_cell("grammars/seed-0", OLD, new, {"kfac"})
    assert differences == []
    assert {(s.method, s.metric): s.change for s in shifts} == {
        ("kfac", "accuracy"): 0.0,
        ("kfac", "coverage"): (0.75 + 0.5 + 0.25 + 0.5 - 0.5 - 0.5 - 0.25 - 1.0) / 4,
    }
    changed = _methods(new["kfac"]["values"]["coverage"], [0.75, 0.5, 0.5, 0.5])
    _, differences = compare_cell("grammars/seed-0", OLD, changed, {"kfac"})
    assert differences == ["grammars/seed-0: less differs, though it was not rescored"]
    with pytest.raises(CellError, match="no ekfac"):
        compare_cell("grammars/seed-0", OLD, new, {"ekfac"})


def test_the_command_line_exits_1_on_a_difference_and_2_on_a_missing_cell(tmp_path, capsys) -> None:
    old = _grid(tmp_path / "old", OLD)
    same = _grid(tmp_path / "same", _methods([0.5, 0.5, 0.5, 1.0], OLD["less"]["values"]["coverage"]))
    assert main([str(old), str(same), "--rescored", "kfac"]) == 0
    out = capsys.readouterr().out
    assert "coverage 0.0625 (seed-0, kfac)" in out and "2 cells" in out and "identical" in out
    other = _grid(tmp_path / "other", _methods(OLD["kfac"]["values"]["coverage"], [0.0, 0.0, 0.0, 0.0]))
    assert main([str(old), str(other), "--rescored", "kfac"]) == 1
    assert "less differs" in capsys.readouterr().err
    (old / "grammars" / "seed-1" / "cell.json").unlink()
    assert main([str(old), str(same), "--rescored", "kfac"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is missing" in err
