"""TrackStar (Chang et al., 2024, arXiv 2410.17413) without its random projection: the cosine of test and
training gradients, each coordinate first divided by the square root of AdamW's second moment at the
run's checkpoint.

``score = cos(g_test / (sqrt(v_hat) + eps), g_train / (sqrt(v_hat) + eps))``. The second moment puts every
coordinate in units of its typical gradient size, so a few coordinates with large gradients do not
decide the ranking, and the unit norms remove each example's gradient scale. TrackStar projects the
normalised gradients to a few thousand numbers to scale to pretraining; LoRA gradients are small enough to
use whole, which is the exact value the projection approximates. Its task-specific Fisher correction is
left out. Needs unprojected gradients and the moments that runs fine-tuned by this version keep.
"""

from __future__ import annotations

import torch

from ..adam import moments_of, second_moment_normalised, unit_rows
from ..base import GradientBlocks, InnerProductMethod, live_blocks
from ..passes import TrainPasses
from ..registry import register


@register
class TrackStar(InnerProductMethod):
    """Score = cosine of the second-moment-normalised test and training gradients; HIGHER = the training
    example supports the test output more."""

    name = "trackstar"
    summary = "TrackStar: cosine of gradients divided by the root of Adam's second moment (unprojected)"
    needs_moments = True
    inverse_fisher = False

    def prepare(self, rows: GradientBlocks, side: str) -> GradientBlocks:
        """Both sides: second-moment normalised, then unit norm over all blocks."""
        scaled = {}
        for name, block in rows.items():
            moments_of(self.moments, name, block.shape[1], self.name)
            assert self.moments is not None
            scaled[name] = second_moment_normalised(self.moments, name, block)
        return unit_rows(scaled)

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        names, dtype = live_blocks(train, test)
        return {name: test[name].to(dtype=dtype) for name in names}
