"""RepT (Li et al., 2025, arXiv 2510.02334; the study's authors' successor): the cosine of representation
signatures, each the last hidden state at the prompt's last token joined with the gradient of the
example's own loss with respect to that hidden state.

The hidden state says what the prompt looks like to the model (RepSim's half); its gradient says how the
model's answer would change it, the part of a parameter gradient that the model's own activations carry.
The two are joined unscaled, as the authors' code does, so where the gradient is small beside the hidden
state the score is close to RepSim's. The gradient comes from the backward pass that collects the weight
gradients, at no extra cost. Sample-level only (the authors' token-level view is not here).
"""

from __future__ import annotations

from typing import ClassVar

from ..registry import register
from .repsim import RepSim


@register
class RepT(RepSim):
    """Score = ``cos([h_test, dL/dh_test], [h_train, dL/dh_train])``; HIGHER = the training example supports
    the test output more."""

    name = "rept"
    summary = "RepT: cosine of [hidden state, its loss gradient] at the prompt's last token"
    with_gradients: ClassVar[bool] = True
