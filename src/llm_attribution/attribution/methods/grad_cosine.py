"""Gradient cosine: the cosine of the test and training gradients over all LoRA matrices together.

Hessian-free's dot product favours training examples with large gradients (often outliers or long,
badly fitted examples); the cosine removes that scale, which is why Bergson, LESS and TrackStar
normalise. The norms are over every block at once, not per block, so it is the cosine of the whole
gradient vectors.
"""

from __future__ import annotations

import torch

from ..base import GradientBlocks, InnerProductMethod, live_blocks
from ..passes import TrainPasses
from ..registry import register


@register
class GradCosine(InnerProductMethod):
    """Score = ``cos(g_test, g_train)`` over all blocks; HIGHER = the training example supports the test
    output more."""

    name = "grad-cosine"
    summary = "cosine of the test and training gradients over all LoRA matrices (no curvature)"
    cosine = True
    inverse_fisher = False

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """The test gradients themselves; the base class divides the summed products by the norms."""
        names, dtype = live_blocks(train, test)
        return {name: test[name].to(dtype=dtype) for name in names}
