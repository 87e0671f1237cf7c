"""Print a run's results.json as a Markdown table: python scripts/results_markdown.py RUN_DIR."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEADER = (
    "| method | accuracy | coverage | seconds | iHVP rel. error vs exact | cos(iHVP, exact) | cos(iHVP, g) |"
)


def _row(name: str, row: dict[str, Any]) -> str:
    err = row.get("ihvp_relative_error_vs_exact")
    cos = row.get("ihvp_cosine", {})
    cells = [
        name,
        f"{row['accuracy']:.3f}",
        f"{row['coverage']:.4f}",
        f"{row['seconds']:.2f}",
        f"{err['median']:.3g} / {err['max']:.3g}" if err else "—",
        *(f"{cos[key]['median']:.3f}" if key in cos else "—" for key in ("vs_exact", "vs_gradient")),
    ]
    return "| " + " | ".join(cells) + " |"


def table(run: Path) -> str:
    record = json.loads((run / "results.json").read_text())
    lines = [
        f"task `{record['task']}`: {record['n_train']} train, {record['n_test']} test, "
        f"{record['n_classes']} classes; adapter of epoch {record['epoch']}",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|",
        *(_row(name, row) for name, row in record["methods"].items()),
        "",
        "iHVP columns: per LoRA block, on the first 20 test gradients g; relative error as median / max over",
        "blocks, cosines as the median over blocks of the mean cosine over tests.",
        "",
        "Feature collection: " + ", ".join(f"{k} {v:.0f} s" for k, v in record["timings"].items()) + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
