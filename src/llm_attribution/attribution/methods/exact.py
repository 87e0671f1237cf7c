"""The exact damped inverse-Fisher product per block: the reference every approximation is judged by.

For one block, ``F = (1/n) G^T G`` (the empirical Fisher of its ``n`` training gradients) and the damping
``lambda`` is DataInf's, so ``exact`` and ``datainf`` approximate the same quantity. The study's official
code ("Original") forms ``F`` densely (``d x d``) and eigendecomposes it, which limits it to small blocks.
Here the system is whichever side is smaller:

- ``n < d`` (the usual LoRA case): Woodbury,
  ``(F + lambda I)^-1 v = (1/lambda) (v - G^T (n lambda I + G G^T)^-1 G v)``, an ``n x n`` system;
- ``n >= d`` (or ``n`` above ``woodbury_max_rows``): the ``d x d`` system ``(G^T G / n + lambda I) x = v``,
  whose ``G^T G`` is accumulated chunk by chunk in memory independent of ``n``.

Both are factorised once per block by Cholesky in float64 (the matrix is symmetric positive definite
for ``lambda > 0``; float64 because ``G G^T`` squares the condition number), then applied to the
test rows in chunks and returned in the compute dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ...core.settings import option, require, require_choice, require_positive
from ..base import DampedSettings, GradientBlocks, InnerProductMethod, live_blocks
from ..passes import TrainPasses, gather_rows
from ..registry import register

logger = logging.getLogger(__name__)

SOLVERS = ("auto", "woodbury", "dense")


@dataclass(frozen=True)
class ExactSettings(DampedSettings):
    """Damping as DataInf's, and which linear system to factorise."""

    solver: str = option(
        "auto", "auto: Woodbury (n x n) when n_train < block dim, else dense (d x d)", choices=SOLVERS
    )
    woodbury_max_rows: int | None = option(
        None,
        "auto: above this n_train use the dense d x d system even when n_train < block dim (bounds the "
        "n x n system; with --projection-dim blocks are narrow and d x d is small); None: no cap",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("solver", self.solver, SOLVERS)
        if self.woodbury_max_rows is not None:
            require(
                isinstance(self.woodbury_max_rows, int),
                f"--woodbury-max-rows must be an integer, got {self.woodbury_max_rows!r}",
            )
            require_positive("woodbury_max_rows", self.woodbury_max_rows)


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
    summary = (
        "the exact damped inverse of the block-diagonal, per-example empirical Fisher (F + lambda "
        "I)^-1 g; not a Hessian"
    )
    Settings = ExactSettings
    settings: ExactSettings

    def uses_woodbury(self, n: int, d: int) -> bool:
        """Whether the ``n x n`` (Woodbury) system is solved rather than the ``d x d`` one."""
        if self.settings.solver == "auto":
            limit = self.settings.woodbury_max_rows
            return n < d and (limit is None or n <= limit)
        return self.settings.solver == "woodbury"

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """The exact damped inverse Fisher applied to every test row. One pass gathers what each block's
        system needs: ``G^T G`` (``d x d``, float64) for the dense
        system, or the block's rows for Woodbury (which ``auto`` picks only while ``n < d``, so at most
        ``d x d`` numbers either way, and ``woodbury_max_rows`` caps ``n`` further)."""
        names, dtype = live_blocks(train, test)
        statistics, n = train.statistics(), train.rows
        woodbury = [name for name in names if self.uses_woodbury(n, statistics[name].width)]
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in woodbury}
        grams = {
            name: torch.zeros(statistics[name].width, statistics[name].width, dtype=torch.float64)
            for name in names
            if name not in rows
        }
        if names:
            for chunk in train:
                for name, parts in rows.items():
                    parts.append(chunk[name])
                for name, gram in grams.items():
                    g = chunk[name].to(torch.float64)
                    gram.addmm_(g.T, g)
        out = {}
        for name in names:
            lam = statistics[name].damping(self.settings.damping_scale)
            v = test[name].to(dtype=dtype)
            if name in rows:
                g = gather_rows(rows.pop(name)).to(device=v.device, dtype=dtype)
                out[name] = self._woodbury(name, g, v, lam)
            else:
                out[name] = self._dense(name, grams.pop(name).to(v.device), n, v, lam)
        return out

    def _woodbury(
        self, block_name: str, train_block: torch.Tensor, test_block: torch.Tensor, lam: float
    ) -> torch.Tensor:
        """``(1/lambda) (v - G^T (n lambda I + G G^T)^-1 G v)`` for every test row ``v``."""
        n = train_block.shape[0]
        g = train_block.to(torch.float64)
        system = g @ g.T
        system.diagonal().add_(n * lam)
        factor, is_cholesky = _factor(system, block_name)
        out = torch.empty_like(test_block)
        for rows in self.chunks(test_block.shape[0]):
            v = test_block[rows].to(torch.float64)
            coefficients = _solve(factor, is_cholesky, g @ v.T)  # (n lambda I + G G^T)^-1 G v, [n, m]
            out[rows] = ((v - coefficients.T @ g) / lam).to(out.dtype)
        return out

    def _dense(
        self, block_name: str, gram: torch.Tensor, n: int, test_block: torch.Tensor, lam: float
    ) -> torch.Tensor:
        """``(G^T G / n + lambda I)^-1 v`` for every test row ``v``, from ``G^T G`` (float64)."""
        system = gram / n
        system.diagonal().add_(lam)
        factor, is_cholesky = _factor(system, block_name)
        out = torch.empty_like(test_block)
        for rows in self.chunks(test_block.shape[0]):
            v = test_block[rows].to(torch.float64)
            out[rows] = _solve(factor, is_cholesky, v.T).T.to(out.dtype)
        return out
