"""The study's published 7B figures, recomputed from its official score files with our metrics."""

from __future__ import annotations

from pathlib import Path

from ...core.errors import UserError
from ...data.settings import DataSettings
from ..judge import judge_scores

# Official file name method -> our method of the same computation.
OFFICIAL_METHODS = {"gmatch": "hessian-free", "inf": "datainf", "lissa": "lissa-study"}


def published_table(official_root: Path, data_root: Path) -> str:
    """Markdown table of accuracy and coverage for every ``<model>/<task>_<epochs>_<method>.csv``."""
    lines = ["| model | task (epochs) | method | accuracy | coverage |", "|---|---|---|---|---|"]
    for path in sorted(official_root.glob("*/*.csv")):
        task, epochs, method = path.stem.rsplit("_", 2)
        try:
            metrics = judge_scores(path, DataSettings(task=str(data_root / task)), "official")
        except UserError as exc:
            lines.append(f"| {path.parent.name} | {task} ({epochs}) | {method} | unreadable: {exc} | |")
            continue
        name = OFFICIAL_METHODS.get(method, method)
        cells = (
            path.parent.name,
            f"{task} ({epochs})",
            name,
            f"{metrics.accuracy:.3f}",
            f"{metrics.coverage:.4f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
