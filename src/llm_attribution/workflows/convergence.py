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

from ..core.errors import ConfigError
from ..core.storage import read_json
from ..diagnostics.convergence import gradient_cosine
from ..evaluation.metrics import Metrics
from ..features.gradients import Features, GradientSettings
from ..scoring.engine import judge_methods
from .attribute import AttributeSettings
from .features import RunFeatures, by_trajectory, features_for, is_replay
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


def convergence(
    run: Path, settings: AttributeSettings, gradients: GradientSettings | None = None
) -> list[EpochRow]:
    """One :class:`EpochRow` per saved epoch, oldest first (features of each epoch are stored and reused)."""
    losses = read_json(run / FINETUNE_FILE)["loss"]["epoch_loss"] if (run / FINETUNE_FILE).is_file() else []
    rows: list[EpochRow] = []
    previous: Features | None = None
    for loaded_run in run_epochs(run):
        epoch, config = typing.cast(int, loaded_run.epoch), loaded_run.config
        features = RunFeatures(
            loaded_run,
            config.prompt,
            gradients or GradientSettings(),
            config.model,
            settings.shard_size,
            settings.needs_kronecker,
        )
        task = loaded_run.task
        train, test, _ = features.in_memory()
        judged: dict[str, Metrics] = {}
        for group in by_trajectory(settings.build_methods()):
            if is_replay(group):
                raise ConfigError(
                    f"{', '.join(group)} replays the fine-tuning run; the convergence diagnostic scores "
                    "features of each epoch: leave it out of --methods here"
                )
            used = features_for(features, group)  # TracIn: the checkpoints up to this epoch
            on = (train, test) if used is features else used.in_memory()[:2]
            judged |= judge_methods(group, *on, [e.label for e in task.train], [e.label for e in task.test])
        rows.append(
            EpochRow(
                epoch=epoch,
                train_loss=losses[epoch - 1] if epoch <= len(losses) else None,
                test_loss=float(test.losses.mean()),
                methods={
                    name: {"accuracy": m.accuracy, "coverage": m.coverage} for name, m in judged.items()
                },
                gradient_cosine_with_previous=(
                    gradient_cosine(previous, train) if previous is not None else None
                ),
            )
        )
        previous = train
    return rows
