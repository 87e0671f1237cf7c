"""A run's fine-tuning, ready to replay (MAGIC): the run's initial adapter and random state restored on a
freshly loaded base model, and the replay checked against the adapter the run saved."""

from __future__ import annotations

import logging

import torch

from ..core.errors import ConfigError
from ..features.replay import TrainingReplay
from ..models.lora import lora_parameters
from ..models.resolve import load_model
from ..models.retrain import Retrainer
from .runs import LoadedRun

log = logging.getLogger(__name__)

REPLAY_TOLERANCE = 1e-3  # largest relative difference from the saved adapter before a warning


def open_replay(loaded_run: LoadedRun) -> TrainingReplay:
    """The replay of the fine-tuning that made ``loaded_run``'s adapter (up to its epoch)."""
    config = loaded_run.config
    if loaded_run.epoch is None:
        raise ConfigError(
            "magic replays the fine-tuning run: it needs a run this tool trained, not an --adapter trained "
            "elsewhere"
        )
    if config.lora.tuning != "lora":
        raise ConfigError(
            "magic replays LoRA fine-tuning runs only; this run is a full fine-tune (--tuning full)"
        )
    base = load_model(config.model)
    retrainer = Retrainer(base.model, base.tokenizer, config.lora, config.train.seed)
    model = retrainer.restore()
    replay = TrainingReplay(
        model, base.tokenizer, loaded_run.task.train, config.prompt, config.train, epochs=loaded_run.epoch
    )
    difference = replay_difference(replay.final(), lora_parameters(loaded_run.model))  # type: ignore[arg-type]
    replay.saved_difference = difference
    if difference > REPLAY_TOLERANCE:
        log.warning(
            "the replayed fine-tuning ends %.2g (relative) away from the saved adapter (trained on another "
            "device, in another precision or data-parallel?): magic's scores are metagradients of the replay",
            difference,
        )
    return replay


def replay_difference(replayed: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> float:
    """Largest over LoRA matrices of max |replayed - saved| / max |saved|."""
    worst = 0.0
    for name, tensor in saved.items():
        scale = float(tensor.detach().abs().max()) or 1.0
        worst = max(worst, float((replayed[name].to(tensor) - tensor.detach()).abs().max()) / scale)
    return worst
