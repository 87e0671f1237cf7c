"""LESS (Xia et al., 2024): the cosine of a test gradient with a training gradient's Adam update, summed
over the checkpoints saved after each epoch, each weighted by the epoch's mean learning rate.

``score = sum_e eta_e * cos(g_test(theta_e), Gamma_e(g_train(theta_e)))``, where ``Gamma_e`` is the
AdamW update a step on that example alone would make from the optimizer's state saved with checkpoint
``e`` (:func:`~..adam.adam_update`). Adam rescales each coordinate by its running gradient size, so the
update direction, not the raw gradient, is what training on the example does to the weights; the cosine
removes the bias towards short, badly fitted examples that large gradients carry. The test side stays a
plain gradient, as in LESS. Needs unprojected gradients (the moments are per coordinate) and runs
fine-tuned by this version (which keep the moments with each epoch).
"""

from __future__ import annotations

import torch

from ...features.checkpoints import block_epoch
from ..adam import adam_update, moments_of, unit_rows
from ..base import TRAIN, GradientBlocks, InnerProductMethod, live_blocks
from ..passes import TrainPasses
from ..registry import register


@register
class Less(InnerProductMethod):
    """Score = sum over checkpoints of the learning rate times the cosine of the test gradient and the
    training gradient's Adam update; HIGHER = the training example supports the test output more."""

    name = "less"
    summary = "LESS: cosine of test gradients and training gradients' Adam updates, summed over checkpoints"
    needs_checkpoints = True
    needs_moments = True
    inverse_fisher = False

    def prepare(self, rows: GradientBlocks, side: str) -> GradientBlocks:
        """Training rows: their Adam updates; both sides: unit norm over each checkpoint's blocks."""
        by_epoch: dict[int, dict[str, torch.Tensor]] = {}
        for name, block in rows.items():
            if side == TRAIN:
                moments_of(self.moments, name, block.shape[1], self.name)
                assert self.moments is not None
                block = adam_update(self.moments, name, block)
            by_epoch.setdefault(block_epoch(name), {})[name] = block
        return {name: row for blocks in by_epoch.values() for name, row in unit_rows(blocks).items()}

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """Each checkpoint's unit test gradients times its epoch's learning rate."""
        names, dtype = live_blocks(train, test)
        return {name: test[name].to(dtype=dtype) * self.checkpoint_rate(name) for name in names}
