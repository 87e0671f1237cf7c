"""Print a run's results.json as Markdown tables: python scripts/results_markdown.py RUN_DIR.

One row per method with its 95% intervals (test examples resampled; accuracy widened to its Wilson
interval) and coverage beside its cap, then the paired differences results.json holds (the best method
by coverage minus each other, on the same test examples)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEADER = (
    "| method | accuracy [95% CI] | coverage [95% CI] | coverage cap | seconds | iHVP rel. error vs exact "
    "| cos(iHVP, exact) | cos(iHVP, g) |"
)


def _with_interval(value: float, bounds: list[float] | None) -> str:
    return f"{value:.3f}" if not bounds else f"{value:.3f} [{bounds[0]:.2f}, {bounds[1]:.2f}]"


def _name(name: str, row: dict[str, Any]) -> str:
    notes = row.get("notes") or {}
    if "converged" in notes and not notes["converged"]:
        short = f"{notes.get('blocks_not_converged')} of {notes.get('blocks')} blocks"
        return f"{name} (depth {notes.get('depth')}, not converged on {short})"
    return name


def _row(name: str, row: dict[str, Any]) -> str:
    err = row.get("ihvp_relative_error_vs_exact")
    cos = row.get("ihvp_cosine", {})
    intervals = row.get("intervals", {})
    cap = intervals.get("coverage_cap")
    cells = [
        _name(name, row),
        _with_interval(row["accuracy"], intervals.get("accuracy")),
        _with_interval(row["coverage"], intervals.get("coverage")),
        f"{cap:.3f}" if cap is not None else "—",
        f"{row['seconds']:.2f}",
        f"{err['median']:.3g} / {err['max']:.3g}" if err else "—",
        *(f"{cos[key]['median']:.3f}" if key in cos else "—" for key in ("vs_exact", "vs_gradient")),
    ]
    return "| " + " | ".join(cells) + " |"


def paired(record: dict[str, Any]) -> list[str]:
    """The best method by coverage minus each other method, both metrics, from ``record["paired"]``."""
    methods = record["methods"]
    if len(methods) < 2 or not record.get("paired"):
        return []
    best = max(methods, key=lambda name: methods[name]["coverage"])
    lines = [
        "",
        f"Paired on the same test examples, `{best}` (the highest coverage) minus each method:",
        "",
        "| minus | accuracy difference [95% CI] | coverage difference [95% CI] |",
        "|---|---|---|",
    ]
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in record["paired"]:
        if best in (entry["a"], entry["b"]):
            sign = 1.0 if entry["a"] == best else -1.0
            other = entry["b"] if entry["a"] == best else entry["a"]
            low, high = sorted((sign * entry["ci_low"], sign * entry["ci_high"]))
            # + 0.0 turns a negated zero into 0.0, so a tie prints as +0.000
            found[(other, entry["metric"])] = {
                "mean": sign * entry["mean"] + 0.0,
                "low": low + 0.0,
                "high": high + 0.0,
            }

    def cell(item: dict[str, Any] | None) -> str:
        if item is None:
            return "—"
        return f"{item['mean']:+.3f} [{item['low']:+.3f}, {item['high']:+.3f}]"

    for other in methods:
        if other != best:
            accuracy, coverage = found.get((other, "accuracy")), found.get((other, "coverage"))
            lines.append(f"| {other} | {cell(accuracy)} | {cell(coverage)} |")
    return lines


def table(run: Path) -> str:
    record = json.loads((run / "results.json").read_text())
    lines = [
        f"task `{record['task']}`: {record['n_train']} train, {record['n_test']} test, "
        f"{record['n_classes']} classes; adapter of epoch {record['epoch']}",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|",
        *(_row(name, row) for name, row in record["methods"].items()),
        *paired(record),
        "",
        "iHVP columns: per LoRA block, on the first 20 test gradients g; relative error as median / max over",
        "blocks, cosines as the median over blocks of the mean cosine over tests.",
        "",
        "Feature collection: " + ", ".join(f"{k} {v:.0f} s" for k, v in record["timings"].items()) + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
