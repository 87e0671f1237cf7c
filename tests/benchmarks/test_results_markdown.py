"""The docs' results table: the best method minus each other, with the sign the pair was stored in undone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "results_markdown.py"


def _script():
    spec = importlib.util.spec_from_file_location("results_markdown", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_pair_stored_the_other_way_round_is_negated() -> None:
    record = {
        "methods": {"low": {"coverage": 0.4}, "high": {"coverage": 0.7}},
        "paired": [  # stored as low minus high: the table must show high minus low
            {"a": "low", "b": "high", "metric": "coverage", "mean": -0.3, "ci_low": -0.4, "ci_high": -0.2},
            {"a": "low", "b": "high", "metric": "accuracy", "mean": 0.0, "ci_low": 0.0, "ci_high": 0.0},
        ],
    }
    lines = _script().paired(record)
    assert "`high` (the highest coverage)" in "\n".join(lines)
    assert lines[-1] == "| low | +0.000 [+0.000, +0.000] | +0.300 [+0.200, +0.400] |"
