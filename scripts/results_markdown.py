"""Print a run's results.json as a Markdown table: python scripts/results_markdown.py RUN_DIR."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(run: Path) -> str:
    record = json.loads((run / "results.json").read_text())
    lines = [
        f"task `{record['task']}`: {record['n_train']} train, {record['n_test']} test, "
        f"{record['n_classes']} classes; adapter of epoch {record['epoch']}",
        "",
        "| method | accuracy | coverage | seconds | iHVP rel. error vs exact (median / max over blocks) |",
        "|---|---|---|---|---|",
    ]
    for name, row in record["methods"].items():
        err = row.get("ihvp_relative_error_vs_exact")
        err_text = f"{err['median']:.3g} / {err['max']:.3g}" if err else "—"
        lines.append(
            f"| {name} | {row['accuracy']:.3f} | {row['coverage']:.4f} | {row['seconds']:.2f} | {err_text} |"
        )
    timings = record["timings"]
    lines += ["", "Feature collection: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
