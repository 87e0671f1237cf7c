"""The study's grid: tasks x methods x fine-tuning seeds on one model, into one folder, resumable.

Each (task, seed) is an ordinary run folder ``OUT/<task>/seed-<s>``, so everything a run reuses (adapters,
features) is reused here: rerunning the same command continues where it stopped, and adding a method
re-scores without retraining. The grid is then judged per test example, so every figure comes with a 95%
bootstrap interval over test examples, the spread over seeds, and a per-class breakdown.
Scores: HIGHER = the training example supports the test output more.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core import distributed
from ..core.settings import option, require, to_dict
from ..core.storage import write_json_atomic
from ..core.versions import package_versions
from ..data.loaders import load_task
from ..evaluation.ranking import ranking_metrics
from ..evaluation.statistics import bootstrap_ci, per_class, seed_spread
from ..features.gradients import GradientSettings
from ..scoring.store import read_run_scores
from .attribute import RESULTS_FILE, AttributeSettings, attribute_explained
from .runs import FinetuneConfig, finetune_run, select_epoch

log = logging.getLogger(__name__)

STUDY_TASKS = ("mixedS", "mixedM", "emotion", "grammars", "math", "backdoor", "multibackdoor")
STUDY_FILE = "study.json"
METRICS = ("accuracy", "coverage", "auc", "average_precision", "reciprocal_rank", "precision_at_10")


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """Which cells of the grid to run."""

    tasks: tuple[str, ...] = option(
        STUDY_TASKS, "comma-separated tasks: names in --data-root, built-ins, or paths"
    )
    seeds: tuple[int, ...] = option((0, 1, 2), "comma-separated fine-tuning seeds (the spread over seeds)")
    data_root: str = option(
        "../shared/data/paper-datasets",
        "folder holding datasets by name (the study's: mixedS, grammars, ...)",
    )

    def __post_init__(self) -> None:
        require(len(self.tasks) > 0, "--tasks must name at least one task")
        require(len(self.seeds) > 0, "--seeds must name at least one seed")


def resolve_task(name: str, data_root: str) -> str:
    """A task name found in ``data_root`` becomes that folder; anything else is passed on unchanged."""
    candidate = Path(data_root) / name
    return str(candidate) if candidate.is_dir() else name


def run_study(
    study: StudySettings,
    base: FinetuneConfig,
    attribute: AttributeSettings,
    gradients: GradientSettings,
    out: Path,
    judge_only: bool = False,
) -> dict[str, Any]:
    """Run (or resume) every (task, seed) cell, then judge every method; writes ``OUT/study.json``.

    ``judge_only`` runs nothing: it judges the cells that are already complete (a grid still running, or
    one stopped part-way) and lists the missing ones in the record.
    """
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    missing = []
    for task in study.tasks:
        data = dataclasses.replace(base.data, task=resolve_task(task, study.data_root))
        cells[task] = {}
        for seed in study.seeds:
            run = out / task / f"seed-{seed}"
            if judge_only:
                if not _complete(run, attribute.methods):
                    missing.append(f"{task}/seed-{seed}")
                    continue
                task_data = load_task(data)
            else:
                config = dataclasses.replace(
                    base, data=data, train=dataclasses.replace(base.train, seed=seed)
                )
                log.info("study: %s, seed %d -> %s", task, seed, run)
                report = finetune_run(config, run)
                explained = select_epoch(report.explained, attribute.epoch)
                attribute_explained(explained, attribute, config.prompt, gradients, config.model)
                task_data = explained.task
            cells[task][seed] = {
                "run": run,
                "labels": ([e.label for e in task_data.train], [e.label for e in task_data.test]),
            }
    record = {
        "convention": "higher score = the training example supports the test output more",
        "settings": {"study": to_dict(study), **base.to_dict(), "attribute": to_dict(attribute)},
        "tasks": {task: judge_task(cells[task], attribute.methods) for task in study.tasks if cells[task]},
        "missing_cells": missing,
        "versions": package_versions(),
    }
    distributed.on_main(write_json_atomic, out / STUDY_FILE, record)
    return record


def _complete(run: Path, methods: Sequence[str]) -> bool:
    return (
        all((run / "scores" / f"{m}.safetensors").is_file() for m in methods)
        and (run / RESULTS_FILE).is_file()
    )


def judge_task(seeds: dict[int, dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method: per-test metrics averaged over seeds, bootstrap intervals, seed spread, per-class means."""
    judged: dict[str, Any] = {}
    for method in methods:
        per_seed: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
        test_labels: list[str] = []
        for cell in seeds.values():
            scores = read_run_scores(cell["run"], method)
            train_labels, test_labels = cell["labels"]
            ranking = ranking_metrics(scores, train_labels, test_labels, precision_ks=(10,))
            values = {
                "accuracy": ranking.hit.astype(float),
                "coverage": ranking.coverage,
                "auc": ranking.auc,
                "average_precision": ranking.average_precision,
                "reciprocal_rank": ranking.reciprocal_rank,
                "precision_at_10": ranking.precision_at[10],
            }
            for name in METRICS:
                per_seed[name].append(values[name])
        judged[method] = {name: _metric_summary(per_seed[name], test_labels) for name in METRICS}
    return judged


def _metric_summary(per_seed: list[np.ndarray], test_labels: Sequence[str]) -> dict[str, Any]:
    # The test set is the same for every seed, so a test's value is averaged over seeds first and the
    # interval is taken over test examples; the seed spread is reported beside it.
    stacked = np.vstack(per_seed)
    per_test = np.nanmean(stacked, axis=0) if np.isfinite(stacked).any() else stacked[0]
    low, high = bootstrap_ci(per_test)
    return {
        "mean": float(np.nanmean(per_test)) if np.isfinite(per_test).any() else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "seeds": seed_spread(
            [float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for v in per_seed]
        ),
        "per_class": per_class(per_test, list(test_labels)),
    }


def study_markdown(record: dict[str, Any]) -> str:
    """The grid as a Markdown table: mean [95% CI] over test examples, and the seed standard deviation."""
    lines = [
        "| task | method | accuracy [95% CI] | coverage [95% CI] | AUC | AUPRC | MRR | P@10 | seed sd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, methods in record["tasks"].items():
        for method, m in methods.items():
            acc, cov = m["accuracy"], m["coverage"]
            lines.append(
                f"| {task} | {method} | {acc['mean']:.3f} [{acc['ci_low']:.2f}, {acc['ci_high']:.2f}] | "
                f"{cov['mean']:.3f} [{cov['ci_low']:.2f}, {cov['ci_high']:.2f}] | {m['auc']['mean']:.3f} | "
                f"{m['average_precision']['mean']:.3f} | {m['reciprocal_rank']['mean']:.3f} | "
                f"{m['precision_at_10']['mean']:.3f} | {acc['seeds']['std']:.3f}/{cov['seeds']['std']:.3f} "
                f"(n={int(acc['seeds']['n'])}) |"
            )
    return "\n".join(lines)


def per_class_markdown(record: dict[str, Any]) -> str:
    """Per task, one row per test class: each method's accuracy / coverage averaged over that class's tests
    (and seeds). It shows which classes a method fails on, which the grid's means hide."""
    parts = []
    for task, methods in record["tasks"].items():
        names = list(methods)
        classes = sorted({c for m in methods.values() for c in m["accuracy"]["per_class"]})
        parts += [
            f"**{task}** (accuracy / coverage per test class)",
            "",
            "| class | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for label in classes:
            cells = [
                f"{methods[m]['accuracy']['per_class'].get(label, float('nan')):.2f} / "
                f"{methods[m]['coverage']['per_class'].get(label, float('nan')):.2f}"
                for m in names
            ]
            shown = label if len(label) <= 40 else label[:37] + "..."
            parts.append(f"| {shown.replace('|', '/')} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts).rstrip()


__all__ = [
    "STUDY_TASKS",
    "StudySettings",
    "per_class_markdown",
    "resolve_task",
    "run_study",
    "study_markdown",
]
