"""Which family of methods leads each task of a judged study, by a proxy metric: per task, the label-blind
method with the highest mean, the methods its paired 95% interval does not separate from it, and each
family's best member with its mean; with `--lds DIR`, the same per task by LDS (DIR/<task>.lds.json, written
by `llm-attr lds`) beside the Spearman correlation between the two rankings of the methods both measured.

    python scripts/study_families.py STUDY_DIR/study.json [--metric coverage] [--lds DIR]

Families group the methods by what they compute, so that "which family wins" is read off the per-method
numbers of `llm-attr study` rather than asserted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from llm_attribution.evaluation.grid import best_label_blind, label_blind
from llm_attribution.evaluation.lds import spearman_rows

FAMILIES: dict[str, tuple[str, ...]] = {
    # raw gradient similarity, no curvature
    "gradient similarity": ("hessian-free", "grad-cosine"),
    # the study's approximations of the inverse-Fisher product
    "study's approximations": ("datainf", "lissa", "lissa-study"),
    # the exact damped inverse of the block-diagonal Fisher and the iterative solve that converges to it
    "exact damped inverse": ("exact", "astra"),
    "Kronecker-factored": ("kfac", "ekfac", "eshampoo"),
    # read the fine-tuning trajectory: per-epoch checkpoints, optimizer state
    "trajectory": ("tracin", "less", "trackstar", "magic"),
    "representation": ("repsim", "rept"),
    "lexical": ("bm25",),
    "valuation (reads labels)": ("knn-shapley",),
}
LABEL_READING = "valuation (reads labels)"


def family_best(family: str, candidates: list[str], value: dict[str, float], digits: int) -> str:
    """The family's member among ``candidates`` with the highest ``value`` as ``name value``, or ``-``."""
    present = [m for m in FAMILIES[family] if m in candidates]
    if not present:
        return "-"
    top = max(present, key=lambda m: value[m])
    return f"{top} {value[top]:.{digits}f}"


def tied_with_best(pairs: list[dict[str, Any]], best: str, metric: str) -> list[str]:
    """The methods whose paired difference from ``best`` has a 95% interval that includes 0."""
    tied = []
    for pair in pairs:
        if pair["metric"] == metric and best in (pair["a"], pair["b"]) and not pair["resolved"]:
            tied.append(pair["b"] if pair["a"] == best else pair["a"])
    return tied


def table(record: dict[str, Any], metric: str) -> str:
    families = [f for f in FAMILIES if any(m in t for t in record["tasks"].values() for m in FAMILIES[f])]
    lines = [
        f"| task | best label-blind by {metric} | not resolved from it | " + " | ".join(families) + " |",
        "|---|---|---|" + "---|" * len(families),
    ]
    for task, methods in record["tasks"].items():
        best = best_label_blind(methods, metric)
        tied = tied_with_best(record["paired"].get(task, []), best, metric)
        means = {m: methods[m][metric]["mean"] for m in methods}
        cells = [family_best(family, list(methods), means, 3) for family in families]
        lines.append(
            f"| {task} | {best} {methods[best][metric]['mean']:.3f} | {', '.join(tied) or 'none'} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def lds_table(record: dict[str, Any], lds: dict[str, dict[str, Any]], metric: str) -> str:
    """Per task with an LDS record: how the label-blind methods measured by both rank by ``metric`` and by
    LDS of the attributed loss (Spearman over methods), the best of each, and each family's best by LDS."""
    families = [f for f in FAMILIES if f != LABEL_READING]  # a method that reads the labels is not ranked
    lines = [
        f"| task | methods | Spearman ({metric}, LDS) | best by {metric} | best by LDS | "
        + " | ".join(families)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(families),
    ]
    for task, methods in record["tasks"].items():
        if task not in lds:
            continue
        by_lds = {m: v["mean"] for m, v in lds[task]["losses"]["attributed"]["methods"].items()}
        shared = [m for m in label_blind(methods) if m in by_lds]
        proxy = {m: methods[m][metric]["mean"] for m in shared}
        rho = float(
            spearman_rows(np.array([[proxy[m] for m in shared]]), np.array([[by_lds[m] for m in shared]]))[0]
        )
        best_proxy = max(shared, key=lambda m: proxy[m])
        best_lds = max(shared, key=lambda m: by_lds[m])
        cells = [family_best(family, shared, by_lds, 2) for family in families]
        lines.append(
            f"| {task} | {len(shared)} | {rho:+.2f} | {best_proxy} {proxy[best_proxy]:.3f} | "
            f"{best_lds} {by_lds[best_lds]:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a study.json written by `llm-attr study`")
    parser.add_argument("--metric", default="coverage", choices=("coverage", "accuracy"))
    parser.add_argument("--lds", type=Path, help="a folder of <task>.lds.json records from `llm-attr lds`")
    args = parser.parse_args()
    record = json.loads(args.study.read_text())
    print(table(record, args.metric))
    if args.lds:
        found = {task: args.lds / f"{task}.lds.json" for task in record["tasks"]}
        lds = {task: json.loads(path.read_text()) for task, path in found.items() if path.is_file()}
        print()
        print(lds_table(record, lds, args.metric))


if __name__ == "__main__":
    main()
