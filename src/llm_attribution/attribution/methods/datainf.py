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

from ..base import DampedSettings, GradientBlocks, InnerProductMethod, live_blocks
from ..passes import TrainPasses
from ..registry import register


@dataclass(frozen=True)
class DataInfSettings(DampedSettings):
    """DataInf's one knob: the damping relative to the mean squared training gradient."""


@register
class DataInf(InnerProductMethod):
    """Score = sum over blocks of ``DataInf(F + lambda I)^-1 g_test . g_train``; HIGHER = more supportive."""

    name = "datainf"
    summary = (
        "DataInf: Sherman-Morrison average of per-example rank-one inverses, block by block "
        "(approximates exact)"
    )
    Settings = DataInfSettings
    settings: DataInfSettings

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """The averaged Sherman-Morrison inverse applied to every test row: one pass over the training
        chunks, each chunk's blocks of equal width stacked and multiplied at once (:meth:`block_groups`)."""
        names, dtype = live_blocks(train, test)
        if not names:
            return {}
        statistics, n = train.statistics(), train.rows
        device = test[names[0]].device
        groups = self.block_groups({name: statistics[name].width for name in names}, n)
        damping = [
            torch.tensor(
                [statistics[name].damping(self.settings.damping_scale) for name in group],
                dtype=dtype,
                device=device,
            )
            for group in groups
        ]
        tests = [torch.stack([test[name].to(device, dtype) for name in group]) for group in groups]
        sums = [v * n for v in tests]  # [B, m, d] per group
        for _, chunk in train.stacked(groups, self.low_precision or dtype, device):
            for lam, v, total, stacked in zip(damping, tests, sums, chunk, strict=True):
                denominators = lam[:, None] + stacked.squares  # lambda + ||g_i||^2, [B, c]
                for rows in self.chunks(v.shape[1]):
                    for cols in self.chunks(denominators.shape[1]):
                        g = stacked.rows[:, cols]
                        # (g_i . v) / (lambda + ||g_i||^2) for every block, test row and training row
                        coefficients = self.product(v[:, rows], g) / denominators[:, None, cols]
                        self.add_product(total[:, rows], coefficients, g.mT, alpha=-1.0)
        return {
            name: total[index] / (n * lam[index])
            for lam, group, total in zip(damping, groups, sums, strict=True)
            for index, name in enumerate(group)
        }
