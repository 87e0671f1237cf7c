"""The report's trust section: per method, how many of a run's test examples get each verdict
(``evaluation.trust``), and, where the run has an LDS, the measured per-test LDS of each verdict, so a
reader sees whether the verdicts mean something on this run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...core.storage import read_json
from ...evaluation.trust import VERDICTS
from ..layout import LDS_FILE, RESULTS_FILE, lds_dir


def trust_section(run: Path, where: Path) -> tuple[str, str, dict[str, bytes]] | None:
    """(title, markdown, no figures), or None when the run's results hold no verdicts."""
    methods = read_json(run / RESULTS_FILE)["methods"]
    readings = {name: entry["trust"] for name, entry in methods.items() if "trust" in entry}
    if not readings:
        return None
    lds_path = lds_dir(run) / LDS_FILE
    measured: dict[str, Any] = {}
    if lds_path.is_file():
        measured = read_json(lds_path)["losses"]["attributed"]["methods"]
    header = "| method | " + " | ".join(VERDICTS) + " |"
    lines = [
        "Each test example's verdict per method: its top-k agreement with the other methods and its score "
        "margin, mapped to a predicted LDS by the shipped calibration (`docs/results/trust-calibration.md`)."
        + (
            " Cells: test examples with that verdict (their mean measured LDS on this run)."
            if measured
            else " Cells: test examples with that verdict (the run has no LDS to check them against)."
        ),
        "",
        header,
        "|---|" + "---|" * len(VERDICTS),
    ]
    for name, reading in readings.items():
        verdicts = np.array(reading["verdicts"])
        per_test = np.asarray(measured[name]["per_test"], dtype=float) if name in measured else None
        cells = []
        for verdict in VERDICTS:
            chosen = verdicts == verdict
            cell = str(int(chosen.sum()))
            if per_test is not None and chosen.any() and len(per_test) == len(verdicts):
                cell += f" ({np.nanmean(per_test[chosen]):.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return f"Should these rankings be trusted? ({where})", "\n".join(lines), {}
