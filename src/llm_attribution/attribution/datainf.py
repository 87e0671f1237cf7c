"""DataInf (Kwon et al., 2024): a closed-form, per-block approximation of the damped inverse Fisher.

For one block with training gradients ``g_1..g_n`` (dimension ``d``) and damping ``lambda``, the exact
product ``(1/n sum_i g_i g_i^T + lambda I)^-1 v`` is replaced by the average of the per-example inverses
``(g_i g_i^T + lambda I)^-1 v``, each closed-form by Sherman-Morrison:

    (1/(n lambda)) sum_i [ v - (g_i . v) g_i / (lambda + ||g_i||^2) ]

This swaps the order of averaging and inversion, so it is exact only when ``n = 1`` and its error grows
with the block's dimension (DataInf's own bound). Damping as in the study and in DataInf's code:
``lambda = 0.1 * mean_i(mean_j g_ij^2)`` (their ``lambda_const_param = 10``). Both the study's and
DataInf's official loops compute exactly this sum; here it is matrix algebra over chunks:
for a test chunk ``V`` and a training chunk ``G_c``, ``sum_i ... = n V - (V G_c^T / (lambda + r_c)) G_c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BlockGroup, DampedSettings, GradientBlocks, InnerProductMethod, register, streamed_blocks
from .passes import TrainPasses


@dataclass(frozen=True)
class DataInfSettings(DampedSettings):
    """DataInf's one knob: the damping relative to the mean squared training gradient."""


@register
class DataInf(InnerProductMethod):
    """Score = sum over blocks of ``DataInf(F + lambda I)^-1 g_test . g_train``; HIGHER = more supportive."""

    name = "datainf"
    Settings = DataInfSettings
    settings: DataInfSettings

    def transform_test(
        self, block_name: str, train_block: torch.Tensor, test_block: torch.Tensor
    ) -> torch.Tensor:
        """The averaged Sherman-Morrison inverse applied to every test row."""
        stack_dtype = self.low_precision or train_block.dtype
        group = BlockGroup.gather(
            [block_name],
            {block_name: train_block},
            {block_name: test_block},
            train_block.dtype,
            stack_dtype,
            train_block.device,
        )
        return torch.zeros_like(test_block) if group is None else self.transform_test_group(group)[0]

    def transform_test_group(self, group: BlockGroup) -> torch.Tensor:
        """The same for blocks of equal width at once, each product batched over the blocks."""
        stacked = group.stacked_train
        n = stacked.shape[1]
        damping = group.damping(self.settings.damping_scale)
        denominators = damping[:, None] + group.row_squares  # lambda + ||g_i||^2, [B, n]
        tests = torch.stack([group.test[name] for name in group.names])
        out = torch.empty_like(tests)
        for rows in self.chunks(tests.shape[1]):
            v = tests[:, rows]
            acc = v * n
            for cols in self.chunks(n):
                g = stacked[:, cols]
                # (g_i . v) / (lambda + ||g_i||^2) for every block, test row and training row
                coefficients = self.product(v, g) / denominators[:, None, cols]
                self.add_product(acc, coefficients, g.mT, alpha=-1.0)
            out[:, rows] = acc / (n * damping)[:, None, None]
        return out

    def transform_test_streamed(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """The same sum, accumulated over one pass of training chunks for every block at once."""
        names, dtype = streamed_blocks(train, test)
        statistics, n = train.statistics(), train.rows
        damping = {name: statistics[name].damping(self.settings.damping_scale) for name in names}
        tests = {name: test[name].to(dtype=dtype) for name in names}
        sums = {name: v * n for name, v in tests.items()}
        for chunk in train:
            for name, v in tests.items():
                g = chunk[name].to(device=v.device, dtype=dtype)
                coefficients = self.product(v, g) / (damping[name] + g.square().sum(dim=1))
                self.add_product(sums[name], coefficients, g.T, alpha=-1.0)
        return {name: total / (n * damping[name]) for name, total in sums.items()}
