"""Random projection of per-example LoRA gradients, Kronecker-structured: no block-sized matrix is formed.

A LoRA matrix ``W`` (``d_out x d_in``) applied at every token has the per-example gradient
``G = sum_t g_t x_t^T`` (``g_t``: the gradient at its output, ``x_t``: its input). Projecting ``vec(G)``
with ``P = P_out (x) P_in`` (Kronecker product of a ``k_out x d_out`` and a ``k_in x d_in`` matrix) gives

    P vec(G) = vec(P_out G P_in^T) = vec(sum_t (P_out g_t)(P_in x_t)^T)

so the token activations and output gradients are projected first and only the small ``k_out x k_in``
product is formed: neither ``G`` nor ``P`` (``k x d_block``) ever exists (as in LoGra).

Each factor has independent ``N(0, 1/k_side)`` entries, so ``E[P_side^T P_side] = I`` and, the factors
being independent, ``E[P^T P] = I``: inner products of projected gradients are unbiased estimates of the
full ones. A side that is already no wider than its share of ``k`` is kept as it is (an identity factor,
which is exact); for a rank-4 LoRA block that is the rank side, so only the model-width side is projected.

Each block's factors come from a CPU generator seeded by the projection seed and the block's name
(:func:`~llm_attribution.core.seeds.block_seed`), so a block gets the same projection for train
and test examples, in every process, on every device, whatever other blocks exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.seeds import block_seed


def factor_dims(d_out: int, d_in: int, dim: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with ``k_out * k_in <= dim``, each no wider than its side.

    The narrower side keeps up to ``isqrt(dim)`` (all of it for a LoRA rank side), the wider side gets
    the rest; a block of at most ``dim`` numbers is not projected at all.
    """
    if d_out * d_in <= dim:
        return d_out, d_in
    if d_out <= d_in:
        k_out = min(d_out, math.isqrt(dim))
        return k_out, min(d_in, dim // k_out)
    k_in = min(d_in, math.isqrt(dim))
    return min(d_out, dim // k_in), k_in


def gaussian_factor(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A ``rows x cols`` matrix of ``N(0, 1/rows)`` entries: ``E[M^T M] = I``."""
    return torch.randn(rows, cols, generator=generator, dtype=torch.float32) / math.sqrt(rows)


@dataclass(frozen=True)
class BlockProjection:
    """The two factors of one block's projection; ``None`` is an identity (that side kept whole)."""

    out: torch.Tensor | None  # [k_out, d_out]
    inp: torch.Tensor | None  # [k_in, d_in]
    shape: tuple[int, int]  # (k_out, k_in): the projected gradient, flattened row-major like W's gradient

    @property
    def width(self) -> int:
        return self.shape[0] * self.shape[1]

    def output_side(self, grad_out: torch.Tensor) -> torch.Tensor:
        """``[..., d_out]`` output gradients -> ``[..., k_out]``."""
        return grad_out if self.out is None else grad_out @ self.out.to(grad_out).T

    def input_side(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[..., d_in]`` inputs -> ``[..., k_in]``."""
        return inputs if self.inp is None else inputs @ self.inp.to(inputs).T


class KroneckerProjector:
    """Per-block Kronecker projections to at most ``dim`` numbers, drawn once per block and cached."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        self.dim = dim
        self.seed = seed
        self._blocks: dict[tuple[str, int, int], BlockProjection] = {}

    def block(self, name: str, d_out: int, d_in: int) -> BlockProjection:
        """The projection of block ``name`` whose weight is ``d_out x d_in`` (float32, on the CPU)."""
        key = (name, d_out, d_in)
        if key not in self._blocks:
            k_out, k_in = factor_dims(d_out, d_in, self.dim)
            generator = torch.Generator().manual_seed(block_seed(self.seed, name, 0))
            # Drawn in a fixed order (output side, then input side) so each factor is reproducible.
            out = gaussian_factor(k_out, d_out, generator) if k_out < d_out else None
            inp = gaussian_factor(k_in, d_in, generator) if k_in < d_in else None
            self._blocks[key] = BlockProjection(out, inp, (k_out, k_in))
        return self._blocks[key]
