"""Attribution quality across training: does an earlier or later checkpoint explain the model better?

For every saved epoch: the training loss, each method's accuracy and coverage with that epoch's adapter,
and how much the training gradients turned since the previous epoch (mean over training examples of the
cosine between an example's whole LoRA gradient at consecutive epochs). The study's section 4.2 found
attribution quality to move with the epoch, not to settle: this makes that visible for any run.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.storage import read_json
from ..features.gradients import Features, GradientSettings
from .attribute import AttributeSettings, collect_run_features, score_methods
from .layout import FINETUNE_FILE
from .runs import run_epochs


@dataclass(frozen=True)
class EpochRow:
    """One checkpoint: its training loss, test loss, per-method metrics and gradient turn."""

    epoch: int
    train_loss: float | None
    test_loss: float
    methods: dict[str, dict[str, float]]
    gradient_cosine_with_previous: float | None


def gradient_cosine(a: Features, b: Features) -> float:
    """Mean over examples of the cosine between their full (all-block) gradients in ``a`` and ``b``."""
    dot = torch.zeros(len(a.ids), dtype=torch.float64)
    norm_a = torch.zeros_like(dot)
    norm_b = torch.zeros_like(dot)
    for name, block in a.blocks.items():
        x, y = block.double(), b.blocks[name].double()
        dot += (x * y).sum(dim=1)
        norm_a += x.square().sum(dim=1)
        norm_b += y.square().sum(dim=1)
    return float((dot / (norm_a.sqrt() * norm_b.sqrt()).clamp(min=1e-300)).mean())


def convergence(
    run: Path, settings: AttributeSettings, gradients: GradientSettings | None = None
) -> list[EpochRow]:
    """One :class:`EpochRow` per saved epoch, oldest first (features of each epoch are stored and reused)."""
    losses = read_json(run / FINETUNE_FILE)["loss"]["epoch_loss"] if (run / FINETUNE_FILE).is_file() else []
    rows: list[EpochRow] = []
    previous: Features | None = None
    for explained in run_epochs(run):
        epoch, config = typing.cast(int, explained.epoch), explained.config
        features, _ = collect_run_features(
            explained, config.prompt, gradients or GradientSettings(), config.model, settings.shard_size
        )
        results = score_methods(settings.build_methods(), features["train"], features["test"], explained.task)
        rows.append(
            EpochRow(
                epoch=epoch,
                train_loss=losses[epoch - 1] if epoch <= len(losses) else None,
                test_loss=float(features["test"].losses.mean()),
                methods={
                    name: {"accuracy": r.metrics.accuracy, "coverage": r.metrics.coverage}
                    for name, r in results.items()
                },
                gradient_cosine_with_previous=(
                    gradient_cosine(previous, features["train"]) if previous is not None else None
                ),
            )
        )
        previous = features["train"]
    return rows


def rows_to_dict(rows: list[EpochRow]) -> list[dict[str, Any]]:
    return [row.__dict__ for row in rows]
