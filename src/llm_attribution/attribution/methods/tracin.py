"""TracIn (Pruthi et al., 2020, "TracInCP"): gradient dot products summed over the checkpoints saved after
each epoch, each weighted by the learning rate of the steps that led to it.

``score(test, train) = sum_e  eta_e * g_test(theta_e) . g_train(theta_e)``, where ``theta_e`` is the
adapter saved after epoch ``e`` and ``eta_e`` the mean learning rate of epoch ``e``'s steps. It first-order
approximates how much the training steps on an example lowered the test loss over the whole run, with no
curvature. The pipeline stacks every checkpoint's gradients as blocks ``epoch-<e>/<block>``
(:mod:`llm_attribution.features.checkpoints`), so the method is a weighted dot product over those blocks.
"""

from __future__ import annotations

import torch

from ..base import GradientBlocks, InnerProductMethod, live_blocks
from ..passes import TrainPasses
from ..registry import register


@register
class TracIn(InnerProductMethod):
    """Score = sum over checkpoints of the epoch's mean learning rate times the gradient dot product;
    HIGHER = the training example supports the test output more."""

    name = "tracin"
    summary = "TracInCP: gradient dot products at every epoch's checkpoint, weighted by its learning rate"
    needs_checkpoints = True
    inverse_fisher = False

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """Each checkpoint's test gradients times its epoch's learning rate."""
        names, dtype = live_blocks(train, test)
        return {name: test[name].to(dtype=dtype) * self.checkpoint_rate(name) for name in names}
