"""``llm-attr lds``: the linear datamodeling score of every method on a run, with the noise ceiling.

M random subsets of the run's training set, each of exactly round(fraction x n) examples; the run's
initial adapter fine-tuned on each with the run's settings and seed (and again with a second seed, for the
noise ceiling); every test example's loss under each retrained adapter. Per method and test example, the
Spearman correlation over subsets between the method's summed scores and minus the loss
(:mod:`~llm_attribution.evaluation.lds`), averaged over test examples with a 95% bootstrap interval. Beside
the methods, three controls: a constant score (0 by construction with equal-size subsets), random scores
(near 0), and the label oracle (the count of the test's own class in the subset).

Retrains are resumable and run in worker processes or under torchrun (:mod:`.retraining`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..core import distributed
from ..core.errors import ConfigError, RunError
from ..core.settings import option, require, require_positive, to_dict
from ..core.storage import read_json, write_json_atomic
from ..core.versions import package_versions
from ..evaluation.grid import noted_name
from ..evaluation.lds import (
    LdsSummary,
    label_oracle_scores,
    lds_per_test,
    noise_ceiling,
    paired_lds,
    subset_masks,
    subset_size,
)
from ..features.gradients import GradientSettings
from ..features.losses import example_losses
from .attribute import AttributeSettings, attribute_run
from .layout import (
    FINETUNE_FILE,
    LDS_FILE,
    SETTINGS_FILE,
    curvature_file,
    lds_dir,
    lds_subset_file,
    lds_work_dir,
)
from .retraining import RetrainJob, RetrainResult, read_result, retrain_all
from .runs import open_run

log = logging.getLogger(__name__)

LOSSES = ("attributed", "response")
CONTROLS = ("constant", "random", "label-oracle")


@dataclass(frozen=True)
class LdsSettings:
    """How many subsets, how large, and with which seeds."""

    subsets: int = option(
        32, "random training subsets, each retrained on (at least 32 for a usable interval)"
    )
    fraction: float = option(0.5, "share of the training set in every subset (all subsets have this size)")
    subset_seed: int = option(
        0, "seed of the subsets (subset i depends only on it and i: more subsets extend)"
    )
    ceiling: bool = option(True, "retrain each subset with a second seed too, for the noise ceiling")
    ceiling_seed: int | None = option(None, "the second training seed; None: the run's seed + 1")
    workers: int = option(1, "retrain this many subsets at once, in worker processes", recorded=False)

    def __post_init__(self) -> None:
        require_positive("subsets", self.subsets)
        require(self.subsets >= 3, f"--subsets must be at least 3 for a rank correlation, got {self.subsets}")
        require(
            0.0 < self.fraction < 1.0, f"--fraction must lie strictly between 0 and 1, got {self.fraction}"
        )
        require_positive("workers", self.workers)


def _subset_record(settings: LdsSettings, n_train: int) -> dict[str, Any]:
    return {"fraction": settings.fraction, "subset_seed": settings.subset_seed, "n_train": n_train}


def _check_folder(run: Path, settings: LdsSettings, n_train: int) -> None:
    """The run's lds folder holds subsets of these settings, or none yet (then it records them)."""
    path = lds_dir(run) / SETTINGS_FILE
    wanted = _subset_record(settings, n_train)
    with distributed.agree():
        if path.is_file() and read_json(path) != wanted:
            previous = read_json(path)
            raise RunError(
                f"{lds_dir(run)} holds subsets of fraction {previous['fraction']} and subset seed "
                f"{previous['subset_seed']}; use those, or delete that folder to start again"
            )
    with distributed.agree():
        if distributed.is_main() and not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, wanted)


def run_lds(
    run: Path, settings: LdsSettings, attribute: AttributeSettings, gradients: GradientSettings
) -> dict[str, Any]:
    """Score the run's methods (reusing stored scores), retrain on every subset, write ``lds.json``."""
    if attribute.epoch is not None:
        raise ConfigError("lds compares scores with fully retrained models: it attributes the last epoch")
    loaded_run = open_run(run)
    if loaded_run.epoch is None:
        raise RunError(f"{run} explains an adapter trained elsewhere: lds needs a run this tool trained")
    config, task = loaded_run.config, loaded_run.task
    n_train = len(task.train)
    size = subset_size(n_train, settings.fraction)
    _check_folder(run, settings, n_train)
    record = attribute_run(loaded_run, attribute, config.prompt, gradients, config.model)
    scores = {
        name: load_file(run / record["methods"][name]["scores"])["scores"] for name in attribute.methods
    }
    full = example_losses(loaded_run.model, loaded_run.tokenizer, task.test, config.prompt)
    masks = subset_masks(n_train, settings.fraction, settings.subset_seed, range(settings.subsets))
    seeds = [config.train.seed]
    if settings.ceiling:
        ceiling_seed = config.train.seed + 1 if settings.ceiling_seed is None else settings.ceiling_seed
        if ceiling_seed == config.train.seed:
            raise ConfigError(f"--ceiling-seed must differ from the run's seed {config.train.seed}")
        seeds.append(ceiling_seed)
    jobs = [
        RetrainJob(
            seed=seed,
            rows=tuple(torch.nonzero(masks[i]).flatten().tolist()),
            out=lds_subset_file(run, seed, i),
            work=lds_work_dir(run, seed, i),
        )
        for i in range(settings.subsets)
        for seed in seeds
    ]
    start = time.perf_counter()
    retrain_all(run, jobs, settings.workers, desc="lds retraining")
    wall = time.perf_counter() - start
    results = {
        seed: [read_result(lds_subset_file(run, seed, i)) for i in range(settings.subsets)] for seed in seeds
    }
    for seed, found in results.items():
        for i, result in enumerate(found):
            if not torch.equal(result.rows, torch.nonzero(masks[i]).flatten()):
                raise RunError(f"{lds_subset_file(run, seed, i)} was retrained on another subset; delete it")
    losses = {
        kind: {seed: torch.stack([getattr(r, kind) for r in found]) for seed, found in results.items()}
        for kind in LOSSES
    }
    sources = _score_sources(scores, [e.label for e in task.train], [e.label for e in task.test])
    table: dict[str, Any] = {}
    for kind in LOSSES:
        measured = losses[kind][seeds[0]]
        table[kind] = {
            "methods": {name: _summary(lds_per_test(s, masks, measured)) for name, s in sources.items()},
            "noise_ceiling": (
                _summary(noise_ceiling(measured, losses[kind][seeds[1]])) if len(seeds) > 1 else None
            ),
            "full_data_mean_loss": float(getattr(full, kind).mean()),
            "subset_mean_loss": float(measured.mean()),
        }
    for kind in LOSSES:
        table[kind]["curvature_references"] = _references(run, sources, masks, losses[kind][seeds[0]])
    finetune_seconds = (
        read_json(run / FINETUNE_FILE).get("seconds") if (run / FINETUNE_FILE).is_file() else None
    )
    seconds = [r.seconds for found in results.values() for r in found]
    out: dict[str, Any] = {
        "what": (
            "per test example, the Spearman correlation over subsets between a method's summed scores and "
            "minus the loss after retraining on the subset; mean over test examples with a 95% bootstrap "
            "interval"
        ),
        "convention": "higher score = the training example supports the test output more",
        "task": task.name,
        "n_train": n_train,
        "n_test": len(task.test),
        "subsets": settings.subsets,
        "subset_size": size,
        "seeds": seeds,
        "settings": to_dict(settings),
        "methods": list(attribute.methods),
        # What each score matrix is (LiSSA's depth and whether it converged, say): a record that only
        # named the method would not say which of its variants the LDS belongs to.
        "method_settings": {name: record["methods"][name].get("settings") for name in attribute.methods},
        "method_notes": {
            name: record["methods"][name]["notes"]
            for name in attribute.methods
            if record["methods"][name].get("notes")
        },
        "controls": list(CONTROLS),
        "losses": table,
        "cost": {
            "seconds_per_retrain": float(np.mean(seconds)),
            "finetune_seconds": finetune_seconds,
            "wall_seconds_this_call": wall,
            "workers": settings.workers,
            "processes": distributed.world_size(),
        },
        "versions": package_versions(),
    }
    path = lds_dir(run) / LDS_FILE
    if path.is_file():
        carry_methods(read_json(path), out)
    distributed.on_main(write_json_atomic, path, out)
    return out


def carry_methods(previous: dict[str, Any], record: dict[str, Any]) -> None:
    """Keep in ``record`` the methods an earlier ``lds`` call scored on the same retrains and this one did
    not, in their earlier order (this call's new methods after them), so that scoring one more method
    does not drop the table's others. A record of other subsets, seeds or test examples is not mixed in:
    its LDS would be of other retrains. Each kept method keeps its own settings and notes."""
    same = ("settings", "seeds", "subsets", "subset_size", "n_train", "n_test", "task")
    if any(previous.get(key) != record[key] for key in same):
        return
    earlier, current = list(previous.get("methods", [])), list(record["methods"])
    kept = [name for name in earlier if name not in current]
    tables = [previous["losses"].get(kind, {}).get("methods", {}) for kind in LOSSES]
    if not kept or any(name not in table for name in kept for table in tables):
        return  # nothing to keep, or an older record without one of the losses: not half-carried
    record["methods"] = [*earlier, *[name for name in current if name not in earlier]]
    for name in kept:
        for kind in LOSSES:
            record["losses"][kind]["methods"][name] = previous["losses"][kind]["methods"][name]
        for key in ("method_settings", "method_notes"):
            if name in previous.get(key, {}):
                record.setdefault(key, {})[name] = previous[key][name]


@dataclass(frozen=True)
class LdsMeasurements:
    """The retrained subsets a run holds for its own seed: masks and the losses measured after each."""

    masks: torch.Tensor  # [M, n_train] bool
    attributed: torch.Tensor  # [M, n_test]
    response: torch.Tensor  # [M, n_test]

    def lds(self, scores: torch.Tensor, loss: str = "attributed") -> float:
        """Mean LDS over test examples of ``scores`` against these retrains (NaN tests left out)."""
        per_test = lds_per_test(scores, self.masks, getattr(self, loss))
        return float(np.nanmean(per_test)) if not np.isnan(per_test).all() else float("nan")


def lds_measurements(run: Path, seed: int) -> LdsMeasurements | None:
    """The run's retrained subsets 0, 1, ... (as many as are done, in a row) for training seed ``seed``;
    None when it has fewer than 3 (no rank correlation)."""
    path = lds_dir(run) / SETTINGS_FILE
    if not path.is_file():
        return None
    recorded = read_json(path)
    results: list[RetrainResult] = []
    while lds_subset_file(run, seed, len(results)).is_file():
        results.append(read_result(lds_subset_file(run, seed, len(results))))
    if len(results) < 3:
        return None
    masks = subset_masks(
        recorded["n_train"], recorded["fraction"], recorded["subset_seed"], range(len(results))
    )
    return LdsMeasurements(
        masks, torch.stack([r.attributed for r in results]), torch.stack([r.response for r in results])
    )


def _score_sources(
    scores: dict[str, torch.Tensor], train_labels: list[str], test_labels: list[str]
) -> dict[str, torch.Tensor]:
    """The methods' score matrices, then the controls' (same shape)."""
    shape = (len(test_labels), len(train_labels))
    for name, matrix in scores.items():
        if tuple(matrix.shape) != shape:
            raise RunError(
                f"the stored scores of {name} are {tuple(matrix.shape)}, not {shape}; rescore the run"
            )
    random = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {
        **scores,
        "constant": torch.ones(shape, dtype=torch.float64),
        "random": random,
        "label-oracle": label_oracle_scores(train_labels, test_labels),
    }


def _references(
    run: Path, sources: dict[str, torch.Tensor], masks: torch.Tensor, measured: torch.Tensor
) -> dict[str, Any]:
    """LDS of the curvature references ``llm-attr curvature`` left in the run (true Hessian, Gauss-Newton,
    full Fisher, each solved for a few test examples), and, paired on the same test rows, every method's."""
    path = curvature_file(run)
    if not path.is_file():
        return {}
    record = read_json(path)
    found: dict[str, Any] = {}
    for kind, solved in record.get("kinds", {}).items():
        tensors = load_file(run / solved["scores"])
        rows = tensors["test_rows"].tolist()
        reference = lds_per_test(tensors["scores"].double(), masks, measured[:, rows])
        found[kind] = {
            **_summary(reference),
            "test_rows": rows,
            "converged": solved["converged"],
            "negative_curvature": solved["negative_curvature"],
            "relative_residual": solved["relative_residual"],
            "damping": solved["damping"]["lambda"],
            "same_rows": {
                name: float(np.nanmean(lds_per_test(matrix[rows], masks, measured[:, rows])))
                for name, matrix in sources.items()
            },
        }
    return found


def _summary(per_test: np.ndarray) -> dict[str, Any]:
    return LdsSummary.of(per_test).to_dict()


def lds_lines(record: dict[str, Any]) -> list[str]:
    """The table ``llm-attr lds`` prints: one row per method and control, both losses."""
    head = f"{'method':<16} {'LDS (attributed loss)':>28}  {'LDS (response loss)':>28}"
    lines = [
        f"LDS on {record['task']}: {record['subsets']} subsets of {record['subset_size']} of "
        f"{record['n_train']} training examples, {record['n_test']} test examples, seeds {record['seeds']}",
        head,
    ]

    def cell(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return f"{'-':>28}"
        low, high = entry["ci95"]
        return f"{entry['mean']:>10.3f} [{low:>6.3f}, {high:>6.3f}]".rjust(28)

    names = [*record["methods"], *record["controls"]]
    for name in names:
        row = [record["losses"][kind]["methods"][name] for kind in LOSSES]
        lines.append(f"{name:<16} {cell(row[0])}  {cell(row[1])}")
    ceiling = [record["losses"][kind]["noise_ceiling"] for kind in LOSSES]
    lines.append(f"{'noise ceiling':<16} {cell(ceiling[0])}  {cell(ceiling[1])}")
    for name, notes in record.get("method_notes", {}).items():  # absent from records made before it
        noted = noted_name(name, notes)
        if noted != name:
            lines.append(f"  {name} = {noted}")
    references = record["losses"]["attributed"].get("curvature_references", {})
    for kind, entry in references.items():
        state = "converged" if all(entry["converged"]) else "NOT converged"
        if any(entry["negative_curvature"]):
            state += ", negative curvature met"
        paired = ", ".join(f"{name} {value:.3f}" for name, value in entry["same_rows"].items())
        lines.append(
            f"{kind + ' (CG)':<16} {cell(entry)}  on test rows {entry['test_rows']} ({state}); "
            f"the same rows: {paired}"
        )
    methods = record["losses"]["attributed"]["methods"]
    differences = paired_lds({name: methods[name]["per_test"] for name in record["methods"]})
    if differences:
        lines.append("paired on the same test examples (attributed loss), the best minus each:")
        for best, other, difference in differences:
            resolved = "resolved" if difference.resolved else "not resolved"
            lines.append(
                f"  {best} - {other:<14} {difference.mean:+.3f} "
                f"[{difference.low:+.3f}, {difference.high:+.3f}]  {resolved}"
            )
    cost = record["cost"]
    lines.append(f"seconds per retrain: {cost['seconds_per_retrain']:.1f}")
    return lines
