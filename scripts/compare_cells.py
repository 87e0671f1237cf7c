"""Compare a study grid's cells before and after some of its methods were scored again.

``llm-attr study`` writes one ``<task>/seed-<s>/cell.json`` per cell with every method's per-test values.
After a change to some methods (``--rescored``) the cells are scored again in the same run folders; this
script checks that every other method's per-test values and notes are identical, and prints how far the
rescored methods' mean accuracy and coverage moved in each cell, then the largest move per task. It exits 1
if any method that was not rescored differs, 2 on a user error.

    git archive REV docs/results/study-every/cells | tar -x -C OLD     # the record before
    python scripts/compare_cells.py OLD/docs/results/study-every/cells docs/results/study-every/cells \
        --rescored kfac,ekfac,astra
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = ("accuracy", "coverage")


class CellError(ValueError):
    """The two grids cannot be compared (a cell or a method missing on one side)."""


@dataclass(frozen=True)
class Shift:
    """How far one rescored method's mean moved in one cell."""

    cell: str  # <task>/seed-<s>
    method: str
    metric: str
    change: float  # new mean over test examples minus the old one


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare_cell(
    cell: str, old: dict[str, Any], new: dict[str, Any], rescored: set[str]
) -> tuple[list[Shift], list[str]]:
    """The rescored methods' shifts, and one line per other method whose values or notes differ."""
    if set(old) != set(new):
        raise CellError(f"{cell}: methods {sorted(new)} against {sorted(old)}")
    missing = rescored - set(new)
    if missing:
        raise CellError(f"{cell}: no {', '.join(sorted(missing))} to compare")
    shifts, differences = [], []
    for method in sorted(new):
        before, after = old[method], new[method]
        if method in rescored:
            shifts += [
                Shift(cell, method, m, _mean(after["values"][m]) - _mean(before["values"][m]))
                for m in METRICS
            ]
        elif before["values"] != after["values"] or before["notes"] != after["notes"]:
            differences.append(f"{cell}: {method} differs, though it was not rescored")
    return shifts, differences


def compare_grids(old: Path, new: Path, rescored: set[str]) -> tuple[list[Shift], list[str]]:
    """Every cell of ``new`` against the same cell of ``old``."""
    paths = sorted(new.glob("*/seed-*/cell.json"))
    if not paths:
        raise CellError(f"no <task>/seed-<s>/cell.json under {new}")
    shifts, differences = [], []
    for path in paths:
        cell = str(path.parent.relative_to(new))
        before = old / cell / "cell.json"
        if not before.is_file():
            raise CellError(f"{before} is missing")
        s, d = compare_cell(
            cell, json.loads(before.read_text())["methods"], json.loads(path.read_text())["methods"], rescored
        )
        shifts += s
        differences += d
    return shifts, differences


def report(shifts: list[Shift]) -> list[str]:
    """One line per cell and method, then the largest absolute shift per task and metric."""
    lines = []
    by_cell: dict[tuple[str, str], dict[str, float]] = {}
    for s in shifts:
        by_cell.setdefault((s.cell, s.method), {})[s.metric] = s.change
    for (cell, method), changes in by_cell.items():
        lines.append(f"{cell:<22} {method:<10} " + "  ".join(f"{m} {changes[m]:+.4f}" for m in METRICS))
    lines.append("")
    for task in dict.fromkeys(s.cell.split("/")[0] for s in shifts):
        parts = []
        for metric in METRICS:
            top = max(
                (s for s in shifts if s.cell.startswith(task + "/") and s.metric == metric),
                key=lambda s: abs(s.change),
            )
            parts.append(f"{metric} {abs(top.change):.4f} ({top.cell.split('/')[1]}, {top.method})")
        lines.append(f"largest |shift| {task:<14} " + "  ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old", type=Path, help="the cells before the rescoring")
    parser.add_argument("new", type=Path, help="the cells after it")
    parser.add_argument("--rescored", required=True, help="comma-separated methods that were scored again")
    args = parser.parse_args(argv)
    try:
        rescored = {m for m in args.rescored.split(",") if m}
        shifts, differences = compare_grids(args.old, args.new, rescored)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(report(shifts)))
    for line in differences:
        print(line, file=sys.stderr)
    cells = len({s.cell for s in shifts})
    print(
        f"{cells} cells; the other methods' per-test values and notes: "
        + ("identical" if not differences else f"{len(differences)} difference(s)")
    )
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
