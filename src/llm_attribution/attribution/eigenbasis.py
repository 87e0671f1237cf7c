"""Kronecker-factored eigenbases: the algebra K-FAC, EK-FAC and eigenvalue-corrected Shampoo share.

A block's per-example gradient is a matrix ``G_i`` (``o x i``, flattened row-major). Given an eigenbasis
``U (x) W`` (``U``: ``o x o``, ``W``: ``i x i``, orthonormal) and one eigenvalue per basis direction
(``Lambda``, ``o x i``), the damped inverse of ``U (x) W diag(Lambda) (U (x) W)^T`` applied to a vector
``V`` (``o x i``) is

    U [ (U^T V W) / (Lambda + lambda) ] W^T        (elementwise division)

K-FAC takes ``Lambda`` as the outer product of the two factors' eigenvalues; the eigenvalue-corrected
variants (George et al., 2018) refit it to the data, ``Lambda_jk = (1/n) sum_i (U^T G_i W)_jk^2``: the
exact variance of the training gradients along each basis direction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError


@dataclass(frozen=True)
class KroneckerEigen:
    """One block's eigenbasis ``U (x) W`` and eigenvalues, in the compute dtype."""

    left: torch.Tensor  # U, [o, o]
    right: torch.Tensor  # W, [i, i]
    eigenvalues: torch.Tensor  # Lambda, [o, i]

    def precondition(self, rows: torch.Tensor, lam: float) -> torch.Tensor:
        """``[k, o, i]`` -> ``U [(U^T V W) / (Lambda + lambda)] W^T`` for every row."""
        rotated = self.left.T @ rows @ self.right
        return self.left @ (rotated / (self.eigenvalues + lam)) @ self.right.T

    def apply(self, flat: torch.Tensor, lam: float, chunk: int) -> torch.Tensor:
        """The damped inverse applied to ``[m, o * i]`` flattened rows, ``chunk`` rows at a time."""
        o, i = self.eigenvalues.shape
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], chunk):
            v = flat[start : start + chunk].reshape(-1, o, i)
            out[start : start + chunk] = self.precondition(v, lam).reshape(v.shape[0], -1)
        return out


def symmetric_eigen(matrix: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: a covariance has none below) and eigenvectors of a symmetric float64
    matrix, in ``dtype``."""
    values, vectors = torch.linalg.eigh(matrix)
    return values.clamp(min=0).to(dtype), vectors.to(dtype)


def fitted_eigenvalues(
    chunks: Iterable[Mapping[str, torch.Tensor]],
    bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    shapes: Mapping[str, tuple[int, int]],
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, KroneckerEigen]:
    """Each block's eigenvalues refitted in its basis ``(U, W)``: the mean over the training rows of
    ``(U^T G_i W)^2``, from one pass over ``chunks``."""
    squares = {name: torch.zeros(shapes[name], dtype=torch.float64, device=device) for name in bases}
    for chunk in chunks:
        for name, (u, w) in bases.items():
            matrices = chunk[name].to(device=device, dtype=dtype).reshape(-1, *shapes[name])
            squares[name] += (u.T @ matrices @ w).square().sum(dim=0, dtype=torch.float64)
    return {name: KroneckerEigen(u, w, (squares[name] / rows).to(dtype)) for name, (u, w) in bases.items()}


def matrix_shape(
    shapes: Mapping[str, tuple[int, int]], method: str, block: str, width: int
) -> tuple[int, int]:
    """The ``(o, i)`` matrix shape of a block's gradient rows (flattened row-major), as bound to a method."""
    shape = shapes.get(block)
    if shape is None:
        raise ConfigError(
            f"{method} needs the matrix shape of block {block}: bind the shapes collected features "
            "record, method.bind_shapes(features.shapes)"
        )
    if shape[0] * shape[1] != width:
        raise ConfigError(f"block {block}: shape {shape} does not hold {width} numbers")
    return shape
