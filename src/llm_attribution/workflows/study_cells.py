"""A study cell's judged record, ``OUT/<task>/seed-<s>/cell.json``: per method the per-test metrics the
grid's judgement needs (:class:`~llm_attribution.evaluation.grid.CellMetrics`) and the method's notes,
with the settings the cell was made with.

The score matrices stay the truth wherever they exist; the record is for where they do not. A grid too
long for one machine or session keeps the records of its finished cells (a few hundred kilobytes each,
against megabytes of scores) and ``llm-attr study --judge-only`` judges them together, to the same numbers
as from the scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import RunError
from ..core.storage import read_json, write_json_atomic
from ..evaluation.grid import CellMetrics, SeedScores, cell_metrics
from ..scoring.store import ScoreStore
from .layout import CELL_FILE, RESULTS_FILE, scores_dir

Labels = tuple[Sequence[str], Sequence[str]]  # (training labels, test labels)


@dataclass(frozen=True)
class JudgedCell:
    """Every method's per-test metrics in one (task, seed) cell, each method's notes, and the seconds its
    scoring took where the run recorded them (features, shared by the methods, are not in them)."""

    metrics: dict[str, CellMetrics]
    notes: dict[str, dict[str, Any]]
    seconds: dict[str, float | None]


def cell_from_scores(run: Path, labels: Labels, methods: Sequence[str]) -> JudgedCell:
    """The cell judged from the score matrices in ``run``."""
    store = ScoreStore(scores_dir(run))
    results = read_json(run / RESULTS_FILE)["methods"] if (run / RESULTS_FILE).is_file() else {}
    return JudgedCell(
        {m: cell_metrics(SeedScores(store.read(m), *labels)) for m in methods},
        {m: store.notes(m) for m in methods},
        {m: results.get(m, {}).get("seconds") for m in methods},
    )


def comparable_settings(finetune: dict[str, Any], method_options: Sequence[str]) -> dict[str, Any]:
    """What must agree between a kept record and the grid judging it: every fine-tuning setting except the
    two a grid varies per cell (the task and the seed), and the method options."""
    kept = {stage: dict(values) for stage, values in finetune.items()}
    kept["data"].pop("task", None)
    kept["train"].pop("seed", None)
    return {"finetune": kept, "method_options": list(method_options)}


def write_cell(run: Path, cell: JudgedCell, task: str, seed: int, settings: dict[str, Any]) -> None:
    record = {
        "task": task,
        "seed": seed,
        "settings": settings,
        "methods": {
            m: {**cell.metrics[m].to_dict(), "notes": cell.notes[m], "seconds": cell.seconds[m]}
            for m in cell.metrics
        },
    }
    write_json_atomic(run / CELL_FILE, record)


def read_cell(run: Path, methods: Sequence[str], settings: dict[str, Any]) -> JudgedCell | None:
    """The kept record of ``run`` when it holds every one of ``methods``; ``None`` when there is none or it
    lacks one. A record made with other settings is an error, not a cell to leave out silently."""
    path = run / CELL_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    if record["settings"] != settings:
        raise RunError(
            f"{path} was made with other settings than this study's (compare its 'settings' with the "
            "options given); judge it with the options it was made with"
        )
    kept = record["methods"]
    if not all(m in kept for m in methods):
        return None
    return JudgedCell(
        {m: CellMetrics.from_dict(kept[m]) for m in methods},
        {m: kept[m]["notes"] for m in methods},
        {m: kept[m].get("seconds") for m in methods},
    )


__all__ = ["JudgedCell", "cell_from_scores", "comparable_settings", "read_cell", "write_cell"]
