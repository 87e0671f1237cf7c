"""RepT (Li et al., 2025, arXiv 2510.02334; the study's authors' successor): the cosine of representation
signatures, each the last hidden state at the prompt's last token joined with the gradient of the
example's own loss with respect to that hidden state.

The hidden state says what the prompt looks like to the model (RepSim's half); its gradient says how the
model's answer would change it, the part of a parameter gradient that the model's own activations carry.
By default the two are joined unscaled, as the authors' code does; where the gradient is small beside the
hidden state the score is then RepSim's (on the tiny model the gradient's norm is about 1e-4 of the
hidden state's). ``rept.halves=unit`` scales each half to unit norm first, so both count alike. The
gradient comes from the backward pass that collects the weight gradients, at no extra cost.

Token level (``explain --tokens``): the same signature at every token of a top training example
(:mod:`~llm_attribution.features.signatures`), each scored against the test signature by the same cosine,
shows which of the training example's tokens carry the match; the one at its prompt's last token is the
sample-level score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...core.settings import option, require_choice
from ..base import MethodSettings
from ..registry import register
from .repsim import RepSim

HALVES = ("raw", "unit")


@dataclass(frozen=True)
class ReptSettings(MethodSettings):
    """How the hidden state and its gradient are joined."""

    halves: str = option(
        "raw", "raw: joined as they are (the authors' code); unit: each half at unit norm", choices=HALVES
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("halves", self.halves, HALVES)


@register
class RepT(RepSim):
    """Score = ``cos([h_test, dL/dh_test], [h_train, dL/dh_train])``; HIGHER = the training example supports
    the test output more."""

    name = "rept"
    summary = "RepT: cosine of [hidden state, its loss gradient] at the prompt's last token"
    with_gradients: ClassVar[bool] = True
    training_token_scores: ClassVar[bool] = True
    Settings = ReptSettings
    settings: ReptSettings

    def score_representations(self, train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        """The cosine of the signatures ``[h, dL/dh]`` (each half at unit norm with ``halves=unit``)."""
        if self.settings.halves == "unit":
            train, test = _unit_halves(train), _unit_halves(test)
        return super().score_representations(train, test)


def _unit_halves(signatures: torch.Tensor) -> torch.Tensor:
    hidden, gradient = signatures.chunk(2, dim=1)
    return torch.cat([F.normalize(hidden, dim=1), F.normalize(gradient, dim=1)], dim=1)
