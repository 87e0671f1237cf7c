"""ASTRA (arXiv 2507.14740): the damped inverse-Fisher product solved iteratively, with EK-FAC as the
preconditioner, so that it converges to ``exact``'s answer while EK-FAC alone stops at its approximation.

Per block, ``(F + lambda I) x = g`` with ``F = (1/n) G^T G`` and the study's damping (the system ``exact``
solves directly), by preconditioned conjugate gradients: each iteration one product with ``F`` (one pass
over the training gradients, ``(x G^T) G / n``) and one EK-FAC solve. EK-FAC's ``(F_EK + lambda I)^-1``
is symmetric positive definite, so the iteration converges for any block; where EK-FAC is already
exact it is done in one step. ASTRA's paper iterates a Neumann series; conjugate gradients need no step
size and converge at least as fast with the same products. Each row stops counting once its residual
``||g - (F + lambda I) x|| / ||g||`` is below ``tolerance``; blocks that reach ``iterations`` without
that say so in the method's notes and in its name in tables.

A caution for LoRA blocks with fewer training examples ``n`` than numbers ``d``: ``F + lambda I`` then has
at most ``n + 1`` distinct eigenvalues, so plain conjugate gradients (``astra.preconditioner=none``) are
done in about ``n + 1`` iterations, and EK-FAC's full-rank approximation can spread that spectrum out and
take more (``tests/attribution/test_astra.py`` measures both on such a block). The preconditioner has
something to win where ``n`` exceeds ``d``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ...core.settings import option, require_choice, require_positive
from ..base import GradientBlocks
from ..eigenbasis import KroneckerEigen
from ..passes import TrainPasses
from ..registry import register
from .kfac import Ekfac, KfacSettings

logger = logging.getLogger(__name__)

PRECONDITIONERS = ("ekfac", "none")


@dataclass(frozen=True)
class AstraSettings(KfacSettings):
    """EK-FAC's damping, and how long the conjugate gradients may run."""

    iterations: int = option(500, "most conjugate-gradient iterations per block (one training pass each)")
    # 1e-7: the damped Fisher is ill-conditioned, so a looser residual leaves answers that differ with
    # rounding (between torchrun slices, say) by more than 1e-5
    tolerance: float = option(1e-7, "relative residual at which a test row has converged")
    preconditioner: str = option(
        "ekfac", "ekfac (ASTRA), or none: plain conjugate gradients, for comparison", choices=PRECONDITIONERS
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("iterations", self.iterations)
        require_positive("tolerance", self.tolerance)
        require_choice("preconditioner", self.preconditioner, PRECONDITIONERS)


@register
class Astra(Ekfac):
    """Score = sum over blocks of ``(F + lambda I)^-1 g_test . g_train`` by EK-FAC-preconditioned conjugate
    gradients; HIGHER = the training example supports the test output more."""

    name = "astra"
    summary = "ASTRA: exact's damped inverse Fisher by conjugate gradients preconditioned with EK-FAC"
    Settings = AstraSettings
    settings: AstraSettings

    def __init__(self, settings: AstraSettings | None = None) -> None:
        super().__init__(settings)
        self.begin_scoring()

    def begin_scoring(self) -> None:
        self.residuals: dict[str, float] = {}  # block -> the largest relative residual of its test rows
        self.iterations_used = 0
        self.blocks_scored = 0

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        eigens, damping, dtype = self.preconditioners(train, test)
        if not eigens:
            return {}
        chunk = self.settings.chunk_size
        g = {name: test[name].to(torch.float64) for name in eigens}
        scale = {
            name: rows.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny) for name, rows in g.items()
        }

        # float64 throughout: the iteration amplifies rounding, and the rows of a torchrun slice must give
        # the same answer as all rows together
        wide = {
            name: KroneckerEigen(e.left.double(), e.right.double(), e.eigenvalues.double())
            for name, e in eigens.items()
        }

        def precondition(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if self.settings.preconditioner == "none":
                return {name: r.clone() for name, r in rows.items()}
            return {name: wide[name].apply(r, damping[name], chunk) for name, r in rows.items()}

        x = {name: torch.zeros_like(rows) for name, rows in g.items()}
        r = {name: rows.clone() for name, rows in g.items()}
        z = precondition(r)
        p = {name: rows.clone() for name, rows in z.items()}
        rz = {name: (r[name] * z[name]).sum(dim=1) for name in g}
        used = 0
        # Each row stops once its own residual is small (it is frozen there), so a row's answer does not
        # depend on which rows or blocks are solved beside it (torchrun slices, streamed vs in memory).
        active = {name: r[name].norm(dim=1) / scale[name] >= self.settings.tolerance for name in g}
        for _ in range(self.settings.iterations):
            if not any(bool(rows.any()) for rows in active.values()):
                break
            used += 1
            ap = self._damped_fisher(train, p, damping)
            for name in g:
                curvature = (p[name] * ap[name]).sum(dim=1)
                alpha = torch.where(curvature > 0, rz[name] / curvature.clamp_min(1e-300), 0.0)
                alpha = torch.where(active[name], alpha, 0.0)
                x[name] += alpha[:, None] * p[name]
                r[name] -= alpha[:, None] * ap[name]
                active[name] &= r[name].norm(dim=1) / scale[name] >= self.settings.tolerance
            z = precondition(r)
            for name in g:
                new = (r[name] * z[name]).sum(dim=1)
                beta = torch.where(rz[name] > 0, new / rz[name].clamp_min(1e-300), 0.0)
                p[name] = z[name] + beta[:, None] * p[name]
                rz[name] = new
        self.iterations_used = max(self.iterations_used, used)
        for name in g:
            self.residuals[name] = float((r[name].norm(dim=1) / scale[name]).max())
        return {name: rows.to(dtype) for name, rows in x.items()}

    @staticmethod
    def _damped_fisher(
        train: TrainPasses, rows: dict[str, torch.Tensor], damping: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        """``(F + lambda I) v`` for every block's rows, ``F v = (v G^T) G / n``: one pass over the chunks."""
        out = {name: damping[name] * v for name, v in rows.items()}
        for chunk in train:
            for name, v in rows.items():
                block = chunk[name].to(device=v.device, dtype=torch.float64)
                out[name] += (v @ block.T) @ block / train.rows
        return out

    def not_converged(self) -> dict[str, float]:
        return {name: res for name, res in self.residuals.items() if res >= self.settings.tolerance}

    def end_scoring(self, n_blocks: int) -> None:
        self.blocks_scored = n_blocks
        missed = self.not_converged()
        if missed:
            logger.warning(
                "astra: %d conjugate-gradient iterations left %d of %d blocks above relative residual %g "
                "(worst %.2g); raise astra.iterations",
                self.settings.iterations,
                len(missed),
                n_blocks,
                self.settings.tolerance,
                max(missed.values()),
            )

    def notes(self) -> dict[str, Any]:
        missed = self.not_converged()
        return {
            "iterations": self.settings.iterations,
            "iterations_used": self.iterations_used,
            "converged": not missed,
            "blocks_not_converged": len(missed),
            "blocks": self.blocks_scored or len(self.residuals),
            "max_relative_residual": max(self.residuals.values(), default=0.0),
        }
