"""The exact damped inverse-Fisher product per block: the reference every approximation is judged by.

For one block, ``F = (1/n) G^T G`` (the empirical Fisher of its ``n`` training gradients) and the damping
``lambda`` is DataInf's, so ``exact`` and ``datainf`` approximate the same quantity. The study's official
code ("Original") forms ``F`` densely (``d x d``) and eigendecomposes it, which limits it to small blocks.
Here the system is whichever side is smaller:

- ``n < d`` (the usual LoRA case): Woodbury,
  ``(F + lambda I)^-1 v = (1/lambda) (v - G^T (n lambda I + G G^T)^-1 G v)``, an ``n x n`` system;
- ``n >= d``: the ``d x d`` system ``(G^T G / n + lambda I) x = v``.

Both are factorised once per block by Cholesky in float64 (the matrix is symmetric positive definite
for ``lambda > 0``; float64 because ``G G^T`` squares the condition number), then applied to the
test rows in chunks and returned in the compute dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..settings import option, require_choice, require_positive
from .base import InnerProductMethod, MethodSettings, block_damping, register

logger = logging.getLogger(__name__)

SOLVERS = ("auto", "woodbury", "dense")


@dataclass(frozen=True)
class ExactSettings(MethodSettings):
    """Damping as DataInf's, and which linear system to factorise."""

    damping_scale: float = option(
        0.1, "damping lambda = damping_scale * mean squared training gradient, per block"
    )
    solver: str = option(
        "auto", "auto: Woodbury (n x n) when n_train < block dim, else dense (d x d)", choices=SOLVERS
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("damping_scale", self.damping_scale)
        require_choice("solver", self.solver, SOLVERS)


def _factor(matrix: torch.Tensor, block_name: str) -> tuple[torch.Tensor, bool]:
    """Cholesky factor of an SPD matrix, or the matrix itself (``False``) when Cholesky fails."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return factor, True
    logger.warning(
        "block %s: Cholesky failed (matrix not numerically positive definite); using an LU solve. "
        "A larger --damping-scale makes the system better conditioned.",
        block_name,
    )
    return matrix, False


def _solve(factor: torch.Tensor, is_cholesky: bool, rhs: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_solve(rhs, factor) if is_cholesky else torch.linalg.solve(factor, rhs)


@register
class Exact(InnerProductMethod):
    """Score = sum over blocks of ``(F + lambda I)^-1 g_test . g_train`` exactly; HIGHER = more supportive."""

    name = "exact"
    Settings = ExactSettings
    settings: ExactSettings

    def uses_woodbury(self, n: int, d: int) -> bool:
        """Whether the ``n x n`` (Woodbury) system is solved rather than the ``d x d`` one."""
        if self.settings.solver == "auto":
            return n < d
        return self.settings.solver == "woodbury"

    def transform_test(
        self, block_name: str, train_block: torch.Tensor, test_block: torch.Tensor
    ) -> torch.Tensor:
        """The exact damped inverse Fisher applied to every test row."""
        n, d = train_block.shape
        lam = block_damping(train_block, self.settings.damping_scale)
        g = train_block.to(torch.float64)
        out = torch.empty_like(test_block)
        if self.uses_woodbury(n, d):
            system = g @ g.T
            system.diagonal().add_(n * lam)
            factor, is_cholesky = _factor(system, block_name)
            for rows in self.chunks(test_block.shape[0]):
                v = test_block[rows].to(torch.float64)
                coefficients = _solve(factor, is_cholesky, g @ v.T)  # (n lambda I + G G^T)^-1 G v, [n, m]
                out[rows] = ((v - coefficients.T @ g) / lam).to(out.dtype)
        else:
            system = (g.T @ g) / n
            system.diagonal().add_(lam)
            factor, is_cholesky = _factor(system, block_name)
            for rows in self.chunks(test_block.shape[0]):
                v = test_block[rows].to(torch.float64)
                out[rows] = _solve(factor, is_cholesky, v.T).T.to(out.dtype)
        return out
