"""Print the Markdown tables of docs/results/ground-truth-embedded.md from the runs of
``scripts/ground_truth.sh``: per task, every method's LDS with its interval beside the noise ceiling and the
controls, its accuracy and coverage beside it (the proxy), and the curvature references where a run has them.

    python scripts/ground_truth_tables.py runs/gt [TASK ...]
    python scripts/ground_truth_tables.py runs/gt --combined [TASK ...]  # tasks side by side
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from llm_attribution.evaluation.grid import noted_name
from llm_attribution.evaluation.lds import spearman_rows
from llm_attribution.evaluation.statistics import bootstrap_ci


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    low, high = entry["ci95"]
    return f"{entry['mean']:.2f} [{low:.2f}, {high:.2f}]"


def task_table(run: Path) -> str:
    lds = json.loads((run / "lds" / "lds.json").read_text())
    results = json.loads((run / "results.json").read_text())["methods"]
    attributed, response = lds["losses"]["attributed"], lds["losses"]["response"]
    lines = [
        f"### {lds['task'].rsplit('/', 1)[-1]}: {lds['n_train']} training / {lds['n_test']} test examples, "
        f"{lds['subsets']} subsets of {lds['subset_size']}, seeds {lds['seeds']}",
        "",
        "| method | LDS, attributed loss | LDS, response loss | accuracy | coverage |",
        "|---|---|---|---|---|",
    ]
    for name in [*lds["methods"], *lds["controls"]]:
        proxy = results.get(name)
        accuracy = f"{proxy['accuracy']:.3f}" if proxy else "-"
        coverage = f"{proxy['coverage']:.3f}" if proxy else "-"
        shown = name
        if name == "lissa" and proxy and "depth" in proxy.get("settings", {}):
            shown = f"lissa (depth {proxy['settings']['depth']}, a partial sum)"
        lines.append(
            f"| {shown} | {_cell(attributed['methods'][name])} | {_cell(response['methods'][name])} | "
            f"{accuracy} | {coverage} |"
        )
    lines.append(
        f"| noise ceiling (seed {lds['seeds'][0]} vs {lds['seeds'][-1]}) | "
        f"{_cell(attributed['noise_ceiling'])} | {_cell(response['noise_ceiling'])} | | |"
    )
    references = attributed.get("curvature_references", {})
    if references:
        lines += [
            "",
            "| curvature reference (CG) | test rows | LDS, attributed loss "
            "| the same rows: exact, hessian-free, datainf | residual (max) | state |",
            "|---|---|---|---|---|---|",
        ]
        for kind, entry in references.items():
            same = entry["same_rows"]
            paired = ", ".join(f"{same[m]:.2f}" for m in ("exact", "hessian-free", "datainf") if m in same)
            state = "converged" if all(entry["converged"]) else "not converged"
            if any(entry["negative_curvature"]):
                state += "; negative curvature"
            lines.append(
                f"| {kind} | {len(entry['test_rows'])} | {_cell(entry)} | {paired} | "
                f"{max(entry['relative_residual']):.1e} | {state} |"
            )
    lines += ["", *_agreement(lds, results)]
    cost = lds["cost"]
    lines += [
        "",
        f"Seconds per retrain: {cost['seconds_per_retrain']:.0f} (the run's fine-tune: "
        f"{cost['finetune_seconds']:.0f} s).",
    ]
    return "\n".join(lines)


def _agreement(lds: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """How the proxy ranks the methods against how LDS does, and paired LDS differences with Hessian-free
    (the same test examples, so the interval is of the per-test difference)."""
    methods = [m for m in lds["methods"] if m in results]
    table = lds["losses"]["attributed"]["methods"]
    means = np.array([[table[m]["mean"] for m in methods]])
    agreement = {
        metric: float(spearman_rows(means, np.array([[results[m][metric] for m in methods]]))[0])
        for metric in ("accuracy", "coverage")
    }
    lines = [
        f"Rank agreement over the {len(methods)} methods (Spearman of their mean LDS with their proxy): "
        f"accuracy {agreement['accuracy']:.2f}, coverage {agreement['coverage']:.2f}.",
        "",
        "| paired with hessian-free (LDS, attributed loss) | mean difference [95% interval] |",
        "|---|---|",
    ]
    base = np.array(table["hessian-free"]["per_test"])
    for name in methods:
        if name == "hessian-free":
            continue
        difference = np.array(table[name]["per_test"]) - base
        low, high = bootstrap_ci(difference)
        lines.append(f"| {name} - hessian-free | {np.nanmean(difference):+.3f} [{low:+.3f}, {high:+.3f}] |")
    return lines


def combined_table(root: Path, tasks: list[str]) -> str:
    """One row per method: its LDS (attributed loss) on every task side by side, and its coverages; a
    method whose notes differ between tasks (an unconverged solver) says so per task."""
    lds = {t: json.loads((root / t / "lds" / "lds.json").read_text()) for t in tasks}
    results = {t: json.loads((root / t / "results.json").read_text())["methods"] for t in tasks}
    head = " | ".join(f"{t} LDS" for t in tasks)
    lines = [f"| method | {head} | coverage ({' / '.join(tasks)}) |", "|---" * (len(tasks) + 2) + "|"]
    first = lds[tasks[0]]
    for name in [*first["methods"], *first["controls"]]:
        noted = [noted_name(name, results[t].get(name, {}).get("notes")) for t in tasks]
        per_task = "; ".join(
            f"{t}: {n.removeprefix(name + ' (').removesuffix(')')}" for t, n in zip(tasks, noted, strict=True)
        )
        shown = noted[0] if len(set(noted)) == 1 else f"{name} ({per_task})"
        cells = " | ".join(_cell(lds[t]["losses"]["attributed"]["methods"].get(name)) for t in tasks)
        coverage = " / ".join(
            f"{results[t][name]['coverage']:.3f}" if name in results[t] else "-" for t in tasks
        )
        lines.append(f"| {shown} | {cells} | {coverage} |")
    ceiling = " | ".join(_cell(lds[t]["losses"]["attributed"]["noise_ceiling"]) for t in tasks)
    lines.append(f"| noise ceiling (seed 0 vs 1) | {ceiling} | |")
    return "\n".join(lines)


def main() -> None:
    combined = "--combined" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--combined"]
    root = Path(args[0])
    tasks = args[1:] or sorted(p.parent.parent.name for p in root.glob("*/lds/lds.json"))
    if combined:
        print(combined_table(root, tasks))
    else:
        print("\n\n".join(task_table(root / task) for task in tasks))


if __name__ == "__main__":
    main()
