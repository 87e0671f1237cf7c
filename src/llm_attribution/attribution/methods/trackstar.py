"""TrackStar (Chang et al., 2024, arXiv 2410.17413): the cosine of test and training gradients, each
coordinate first divided by the square root of AdamW's second moment at the run's checkpoint, and
optionally randomly projected.

``score = cos(P (g_test / (sqrt(v_hat) + eps)), P (g_train / (sqrt(v_hat) + eps)))``. The second moment puts
every coordinate in units of its typical gradient size, so a few coordinates with large gradients do not
decide the ranking, and the unit norms remove each example's gradient scale. TrackStar projects the
normalised gradients to a few thousand numbers to scale to pretraining: ``trackstar.projection_dim`` does
that per LoRA matrix with the collection's Kronecker-structured Gaussian projection (the normalisation
needs every coordinate, so it cannot be done at collection time). By default nothing is projected: LoRA
gradients are small enough to use whole, which is the exact value the projection approximates. Its
task-specific Fisher correction is left out. Needs unprojected gradients and the moments that runs
fine-tuned by this version keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ...core.errors import ConfigError
from ...core.settings import option, require
from ...features.projection import KroneckerProjector
from ..adam import moments_of, second_moment_normalised, unit_rows
from ..base import GradientBlocks, InnerProductMethod, MethodSettings, live_blocks
from ..passes import TrainPasses
from ..registry import register


@dataclass(frozen=True)
class TrackStarSettings(MethodSettings):
    """Whether, and how, the normalised gradients are projected."""

    projection_dim: int | None = option(
        None,
        "project each LoRA matrix's normalised gradient to at most this many numbers (Kronecker-structured "
        "Gaussian, as --projection-dim); unset: no projection, the exact value it approximates",
        recorded_at_default=False,
    )
    projection_seed: int = option(
        0,
        "seed of the projection (each block's is drawn from it and the block's name)",
        recorded_at_default=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection_dim is not None:
            require(
                isinstance(self.projection_dim, int) and self.projection_dim > 0,
                f"trackstar.projection_dim must be a positive integer, got {self.projection_dim!r}",
            )


@register
class TrackStar(InnerProductMethod):
    """Score = cosine of the second-moment-normalised (optionally projected) test and training gradients;
    HIGHER = the training example supports the test output more."""

    name = "trackstar"
    summary = (
        "TrackStar: cosine of gradients divided by the root of Adam's second moment (projection optional)"
    )
    needs_moments = True
    inverse_fisher = False
    Settings = TrackStarSettings
    settings: TrackStarSettings

    @cached_property
    def projector(self) -> KroneckerProjector | None:
        dim = self.settings.projection_dim
        return None if dim is None else KroneckerProjector(dim, self.settings.projection_seed)

    def prepare(self, rows: GradientBlocks, side: str) -> GradientBlocks:
        """Both sides: second-moment normalised, projected if asked, then unit norm over all blocks."""
        scaled = {}
        for name, block in rows.items():
            moments_of(self.moments, name, block.shape[1], self.name)
            assert self.moments is not None
            scaled[name] = self.projected(name, second_moment_normalised(self.moments, name, block))
        return unit_rows(scaled)

    def projected(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """``[n, o * i]`` rows of block ``name`` mapped to ``P_out G P_in^T``, flattened like the rows."""
        if self.projector is None:
            return rows
        if name not in self.block_shapes:
            raise ConfigError(f"trackstar projects each LoRA matrix, and block {name!r} has no known shape")
        d_out, d_in = self.block_shapes[name]
        block = self.projector.block(name, d_out, d_in)
        matrices = rows.reshape(rows.shape[0], d_out, d_in)
        # P_out G: the output side acts on G's columns, so project G^T's last axis and transpose back.
        left = block.output_side(matrices.mT).mT
        return block.input_side(left).reshape(rows.shape[0], block.width)

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        names, dtype = live_blocks(train, test)
        return {name: test[name].to(dtype=dtype) for name in names}
