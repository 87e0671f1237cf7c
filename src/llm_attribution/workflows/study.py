"""The study's grid: tasks x methods x fine-tuning seeds on one model, into one folder, resumable.

Each (task, seed) is an ordinary run folder ``OUT/<task>/seed-<s>``, so everything a run reuses (adapters,
features) is reused here: rerunning the same command continues where it stopped, and adding a method
re-scores without retraining. The grid is then judged per test example, so every figure comes with a 95%
bootstrap interval over test examples, the spread over seeds, and a per-class breakdown. Each finished
cell also keeps its judged record (``cell.json``, :mod:`.study_cells`), so that ``--judge-only`` can judge a
grid whose cells were run on other machines or in other sessions from those records alone.
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
from ..evaluation.grid import judge_cells, paired_differences
from ..features.gradients import GradientSettings
from ..scoring.store import ScoreStore
from .attribute import AttributeSettings, attribute_run
from .layout import RESULTS_FILE, STUDY_FILE, scores_dir, study_cell
from .runs import FinetuneConfig, finetune_run, select_epoch
from .study_cells import JudgedCell, cell_from_scores, comparable_settings, read_cell, write_cell

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
    one stopped part-way) and lists the missing ones in the record. A cell without its scores but with a
    kept record (``cell.json``) of every method, made with the same settings, is complete: it is judged
    from that record and not run again.
    """
    cells: dict[str, dict[int, JudgedCell]] = {}
    missing = []
    kept_settings = comparable_settings(base.to_dict(), attribute.method_options)
    for task in study.tasks:
        data = dataclasses.replace(base.data, task=resolve_task(task, study.data_root))
        cells[task] = {}
        for seed in study.seeds:
            run = study_cell(out, task, seed)
            config = dataclasses.replace(base, data=data, train=dataclasses.replace(base.train, seed=seed))
            if not _complete(run, attribute.methods):
                # no scores here: the cell's kept record, if it holds every method (a cell run elsewhere
                # or in an earlier session), counts as done
                kept = read_cell(run, attribute.methods, kept_settings)
                if kept is not None:
                    cells[task][seed] = kept
                    continue
                if judge_only:
                    missing.append(f"{task}/seed-{seed}")
                    continue
            if judge_only:
                task_data = load_task(data)
            else:
                log.info("study: %s, seed %d -> %s", task, seed, run)
                report = finetune_run(config, run)
                loaded_run = select_epoch(report.loaded_run, attribute.epoch)
                attribute_run(loaded_run, attribute, config.prompt, gradients, config.model)
                task_data = loaded_run.task
            labels = ([e.label for e in task_data.train], [e.label for e in task_data.test])
            cells[task][seed] = cell_from_scores(run, labels, attribute.methods)
            distributed.on_main(write_cell, run, cells[task][seed], task, seed, kept_settings)
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


def judge_task(seeds: dict[int, JudgedCell], methods: Sequence[str]) -> dict[str, Any]:
    """Per method, the grid's judgement (:func:`~llm_attribution.evaluation.grid.judge_cells`) of its
    per-test metrics in every seed's cell."""
    judged = {}
    cells = list(seeds.values())
    for method in methods:
        judged[method] = judge_cells([cell.metrics[method] for cell in cells])
        timed = [t for cell in cells if (t := cell.seconds.get(method)) is not None]
        if timed:  # wall seconds of scoring per cell, on whatever machine (and load) ran each cell
            judged[method]["seconds"] = {"mean": sum(timed) / len(timed), "n": len(timed)}
        notes = cells[0].notes[method] if cells else {}
        if notes:  # e.g. LiSSA's depth and convergence (the first seed's: every seed has the same settings)
            judged[method]["notes"] = notes
    return judged


__all__ = [
    "STUDY_TASKS",
    "StudySettings",
    "resolve_task",
    "run_study",
]
