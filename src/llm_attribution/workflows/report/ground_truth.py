"""The report's ground-truth sections: a run's LDS (``llm-attr lds``) and its remove-and-retrain curves
(``llm-attr counterfactual``), each when the run has them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...core.storage import read_json
from ..counterfactual import group_cells
from ..layout import COUNTERFACTUAL_FILE, LDS_FILE, counterfactual_dir, lds_dir
from .figures import interval_bars_figure, panels_figure

Sections = list[tuple[str, str, dict[str, bytes]]]


def ground_truth_sections(run: Path, where: Path) -> Sections:
    """(title, markdown, figures) for the run's LDS and counterfactual results, those it has."""
    sections: Sections = []
    if (lds_dir(run) / LDS_FILE).is_file():
        sections.append(_lds(read_json(lds_dir(run) / LDS_FILE), run, where))
    if (counterfactual_dir(run) / COUNTERFACTUAL_FILE).is_file():
        sections.append(_counterfactual(read_json(counterfactual_dir(run) / COUNTERFACTUAL_FILE), run, where))
    return sections


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def _lds(record: dict[str, Any], run: Path, where: Path) -> tuple[str, str, dict[str, bytes]]:
    names = [*record["methods"], *record["controls"]]
    tables = record["losses"]
    lines = [
        f"{record['subsets']} random subsets of exactly {record['subset_size']} of {record['n_train']} "
        f"training examples, retrained with seeds {record['seeds']}; per test example the Spearman "
        "correlation over subsets between a method's summed scores and minus the loss after retraining, "
        f"mean over {record['n_test']} test examples [95% bootstrap interval]. The noise ceiling correlates "
        "two seeds' retrained losses on the same subsets. Controls: constant (0 by construction), random, "
        "label oracle (the count of the test's own class in the subset).",
        "",
        "| method | LDS (attributed loss) | LDS (response loss) |",
        "|---|---|---|",
        *(
            f"| {name} | {_cell(tables['attributed']['methods'][name])} | "
            f"{_cell(tables['response']['methods'][name])} |"
            for name in names
        ),
        f"| noise ceiling | {_cell(tables['attributed']['noise_ceiling'])} | "
        f"{_cell(tables['response']['noise_ceiling'])} |",
    ]
    for kind, entry in tables["attributed"].get("curvature_references", {}).items():
        state = "converged" if all(entry["converged"]) else "not converged"
        lines.append(f"| {kind} (CG, {state}, test rows {entry['test_rows']}) | {_cell(entry)} | |")
    ceiling = tables["attributed"]["noise_ceiling"]
    figure = interval_bars_figure(
        {name: tables["attributed"]["methods"][name] for name in names},
        "LDS (attributed loss)",
        f"LDS on {record['task']} ({record['subsets']} subsets)",
        reference=None if ceiling is None else ("noise ceiling", ceiling["mean"]),
    )
    return f"Ground truth: LDS ({where})", "\n".join(lines), {f"lds-{run.name}": figure}


def _counterfactual(record: dict[str, Any], run: Path, where: Path) -> tuple[str, str, dict[str, bytes]]:
    sources = [*record["methods"], *record["baselines"]]
    ks = record["settings"]["k"]
    figures: dict[str, bytes] = {}
    lines = [record["what"] + ".", ""]
    for index, group in enumerate(record["groups"]):
        found = group_cells(record, group["label"])

        def series(measure: str, found: dict = found) -> dict[str, list[float | None]]:
            return {s: [found[(s, k)].get(measure) if (s, k) in found else None for k in ks] for s in sources}

        panels = [("Response-loss change after removal", "loss change", series("response_loss_change"))]
        if group["full_behaviour_rate"] is not None:
            panels.append(("Behaviour rate after removal", "rate", series("behaviour_rate")))
        figures[f"counterfactual-{run.name}-{index}"] = panels_figure(ks, "k removed", panels)
        rate = group["full_behaviour_rate"]
        lines.append(
            f"Group `{group['label']}`: {group['n_test']} test examples, "
            f"{group['n_train_of_class']} training examples of its class; "
            f"full data: response loss {group['full_response_loss']:.3f}"
            + ("" if rate is None else f", behaviour rate {rate:.2f}")
            + "."
        )
    return f"Ground truth: remove and retrain ({where})", "\n".join(lines), figures
