"""Hessian-free influence ("gradient match"): the plain inner product of test and training gradients.

It drops the inverse Hessian entirely. The study finds it ranks like DataInf and LiSSA whenever the
per-block Fisher has rank far below its dimension, because then ``(F + lambda I)^-1 ~ I / lambda``.
"""

from __future__ import annotations

import torch

from ..base import GradientBlocks, InnerProductMethod, live_blocks
from ..passes import TrainPasses
from ..registry import register


@register
class HessianFree(InnerProductMethod):
    """Score = sum over blocks of ``g_test . g_train``; HIGHER = the training example is more supportive."""

    name = "hessian-free"
    summary = "the plain gradient dot product g_test . g_train (the study's gradient match)"

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """The test gradients themselves; no pass beyond the statistics."""
        names, dtype = live_blocks(train, test)
        return {name: test[name].to(dtype=dtype) for name in names}
