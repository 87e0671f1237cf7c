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

from ..core import distributed
from ..core.settings import option, require, to_dict
from ..core.storage import write_json_atomic
from ..core.versions import package_versions
from ..data.loaders import load_task
from ..evaluation.grid import SeedScores, judge_method, paired_differences
from ..features.gradients import GradientSettings
from ..scoring.store import ScoreStore
from .attribute import AttributeSettings, attribute_run
from .layout import RESULTS_FILE, STUDY_FILE, scores_dir, study_cell
from .runs import FinetuneConfig, finetune_run, select_epoch

log = logging.getLogger(__name__)

STUDY_TASKS = ("mixedS", "mixedM", "emotion", "grammars", "math", "backdoor", "multibackdoor")


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
            run = study_cell(out, task, seed)
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
                loaded_run = select_epoch(report.loaded_run, attribute.epoch)
                attribute_run(loaded_run, attribute, config.prompt, gradients, config.model)
                task_data = loaded_run.task
            cells[task][seed] = {
                "run": run,
                "labels": ([e.label for e in task_data.train], [e.label for e in task_data.test]),
            }
    judged = {task: judge_task(cells[task], attribute.methods) for task in study.tasks if cells[task]}
    record = {
        "convention": "higher score = the training example supports the test output more",
        "settings": {"study": to_dict(study), **base.to_dict(), "attribute": to_dict(attribute)},
        "tasks": judged,
        "paired": {task: paired_differences(methods) for task, methods in judged.items()},
        "missing_cells": missing,
        "versions": package_versions(),
    }
    distributed.on_main(write_json_atomic, out / STUDY_FILE, record)
    return record


def _complete(run: Path, methods: Sequence[str]) -> bool:
    store = ScoreStore(scores_dir(run))
    return all(store.path(m).is_file() for m in methods) and (run / RESULTS_FILE).is_file()


def judge_task(seeds: dict[int, dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method, the grid's judgement (:func:`~llm_attribution.evaluation.grid.judge_method`) of its
    scores in every seed's run (``{seed: {"run": folder, "labels": (train, test)}}``)."""
    judged = {}
    for method in methods:
        cells = list(seeds.values())
        stores = [ScoreStore(scores_dir(cell["run"])) for cell in cells]
        judged[method] = judge_method(
            [
                SeedScores(store.read(method), *cell["labels"])
                for store, cell in zip(stores, cells, strict=True)
            ]
        )
        notes = stores[0].notes(method) if stores else {}
        if notes:  # e.g. LiSSA's depth and convergence (the first seed's: every seed has the same settings)
            judged[method]["notes"] = notes
    return judged


__all__ = [
    "STUDY_TASKS",
    "StudySettings",
    "resolve_task",
    "run_study",
]
