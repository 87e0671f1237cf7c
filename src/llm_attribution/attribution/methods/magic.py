"""MAGIC (Ilyas and Engstrom, 2025, arXiv 2504.16430): exact metagradients of a test loss with respect to
per-example data weights, through the whole fine-tuning run.

``score(test j, train i) = - d loss_j(theta_T(w)) / d w_i`` at ``w = 1``, where ``theta_T(w)`` is the
adapter the run ends with when example ``i``'s loss is weighted ``w_i`` at every step it is in, every
batch, dropout mask and schedule as recorded. It is the first-order prediction of how much the test loss
rises when example ``i``'s weight goes from 1 to 0 (HIGHER = removing it hurts the test output more =
it supports it more). No curvature is approximated: the derivative is exact for the run's own optimiser
(AdamW, clipping, schedule), by reverse-mode differentiation through every step
(:class:`~llm_attribution.features.replay.TrainingReplay`). LoRA keeps the state small (the adapter and
the two AdamW moments), which is what makes this affordable; each group of ``queries_per_pass`` test
examples costs one pass back over every training step (about three training steps' work each).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...core.settings import option, require_positive
from ...data.schema import Example
from ...features.replay import TrainingReplay
from ..base import MethodSettings, ReplayMethod
from ..registry import register


@dataclass(frozen=True)
class MagicSettings(MethodSettings):
    queries_per_pass: int = option(
        4,
        "test examples whose metagradients share one reverse pass over the training steps (memory grows "
        "with it; the result does not depend on it)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("magic.queries_per_pass", self.queries_per_pass)


@register
class Magic(ReplayMethod):
    """Score = minus the metagradient of the test loss with respect to the training example's weight;
    HIGHER = the training example supports the test output more."""

    name = "magic"
    summary = (
        "MAGIC: exact metagradients of the test loss w.r.t. each example's weight, through the replayed run"
    )
    Settings = MagicSettings
    settings: MagicSettings

    def __init__(self, settings: MethodSettings | None = None) -> None:
        super().__init__(settings)
        self._notes: dict[str, Any] = {}

    def score_replay(self, replay: TrainingReplay, test: Sequence[Example]) -> torch.Tensor:
        start = time.perf_counter()
        scores = -replay.metagradients(test, self.settings.queries_per_pass)
        seconds = time.perf_counter() - start
        self._notes = {
            "steps": len(replay.steps),
            "seconds_per_query": round(seconds / max(len(test), 1), 3),
        }
        if replay.saved_difference is not None:  # how far the replay ends from the run's own adapter
            self._notes["replay_difference"] = replay.saved_difference
        return scores.float()

    def notes(self) -> dict[str, Any]:
        return dict(self._notes)
