"""The spectrum of each block's empirical Fisher, and how much of a test gradient it leaves to the damping.

``F = (1/n) G^T G`` for a block's ``[n, d]`` training gradients has at most ``n`` non-zero eigenvalues, the
eigenvalues of the ``n x n`` Gram matrix ``(1/n) G G^T`` (cheap when ``n < d``). Where the damping ``lambda``
exceeds an eigenvalue, ``(F + lambda I)^-1`` acts on that direction like ``I / lambda``; if most of a test
gradient's energy lies there, inverse-Fisher scores rank like Hessian-free ones (the study's section 4.1).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from ..attribution.base import GradientBlocks, block_damping, check_blocks
from ..core.settings import require_positive

RELATIVE_RANK_TOL = 1e-10


@dataclass(frozen=True)
class BlockSpectrum:
    """One block's Fisher spectrum against its damping, and the test gradients' energy below it."""

    n: int
    d: int
    rank: int
    effective_rank: float  # exp of the entropy of the normalised eigenvalues
    top_eigenvalue: float
    damping: float
    share_directions_below_damping: float  # of all d directions (the null space counts)
    share_test_energy_below_damping: float  # mean over test gradients


def block_spectrum(train: torch.Tensor, test: torch.Tensor, damping_scale: float = 0.1) -> BlockSpectrum:
    """The spectrum of ``(1/n) G^T G`` through the Gram matrix, in float64."""
    g = train.double()
    n, d = g.shape
    damping = block_damping(train, damping_scale)
    eigenvalues, vectors = torch.linalg.eigh(g @ g.T / n)
    eigenvalues = eigenvalues.clamp(min=0.0)
    top = float(eigenvalues.max())
    nonzero = eigenvalues > RELATIVE_RANK_TOL * max(top, 1e-300)
    p = eigenvalues[nonzero] / eigenvalues[nonzero].sum()
    effective_rank = math.exp(float(-(p * p.log()).sum())) if bool(nonzero.any()) else 0.0
    above = eigenvalues >= damping
    # Energy of v along F's eigenvector i is (u_i^T G v)^2 / (n mu_i) for mu_i > 0.
    v = test.double()
    projected = (v @ g.T) @ vectors[:, above]  # [m, k]
    energy_above = (projected.square() / (n * eigenvalues[above])).sum(dim=1)
    total = v.square().sum(dim=1).clamp(min=1e-300)
    return BlockSpectrum(
        n=n,
        d=d,
        rank=int(nonzero.sum()),
        effective_rank=effective_rank,
        top_eigenvalue=top,
        damping=damping,
        share_directions_below_damping=1.0 - int(above.sum()) / d,
        share_test_energy_below_damping=float((1.0 - energy_above / total).clamp(0.0, 1.0).mean()),
    )


def spectra(
    train: GradientBlocks, test: GradientBlocks, damping_scale: float = 0.1
) -> dict[str, BlockSpectrum]:
    """:func:`block_spectrum` of every block with non-zero training gradients."""
    require_positive("damping_scale", damping_scale)  # no damping: no threshold to compare against
    names, _, _ = check_blocks(train, test)
    return {
        name: block_spectrum(train[name], test[name], damping_scale)
        for name in names
        if bool(train[name].any())
    }


def summarize_spectra(per_block: Mapping[str, BlockSpectrum]) -> dict[str, float]:
    """Medians over blocks of every field (and the block count)."""
    rows = [asdict(s) for s in per_block.values()]
    if not rows:
        return {"blocks": 0}
    summary: dict[str, float] = {"blocks": len(rows)}
    for key in rows[0]:
        summary[f"median_{key}"] = statistics.median(float(r[key]) for r in rows)
    return summary
