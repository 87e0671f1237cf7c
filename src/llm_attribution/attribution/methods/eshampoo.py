"""Eigenvalue-corrected Shampoo: an eigenbasis from the per-example gradient matrices, eigenvalues fitted.

A block's per-example gradient is a matrix ``G_i`` (``o x i``: the LoRA matrix's shape, or its projected
shape). Shampoo's two factors of the gradients themselves, ``L = (1/n) sum_i G_i G_i^T`` (``o x o``) and
``R = (1/n) sum_i G_i^T G_i`` (``i x i``), give an eigenbasis ``U (x) W`` (their eigenvectors); the
eigenvalues are then refitted to the data in that basis (:mod:`..eigenbasis`), as EK-FAC does with its
own basis, and the damped inverse is applied there.

This is not K-FAC: K-FAC's factors are covariances of each token's layer input and output gradient
(``kfac`` and ``ekfac``, :mod:`.kfac`), which need hooks at collection time; these need only the stored
gradients (so projected gradients, streamed scoring and every stored run work as they are). Until the
token-level methods existed this method was called ``ekfac-example``, which stays an alias.

The damping is the study's: ``lambda = damping_scale * mean squared training gradient``, which equals
``damping_scale * mean(Lambda)`` (the rotation keeps squared norms). If the Fisher is itself diagonal in
a Kronecker basis the result is the exact damped inverse, as the tests check; with a block shaped
``1 x d`` it is the exact inverse outright (``U = 1``, ``W`` the Fisher's eigenvectors).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..base import DampedSettings, GradientBlocks, InnerProductMethod, live_blocks
from ..eigenbasis import KroneckerEigen, fitted_eigenvalues, matrix_shape
from ..passes import TrainPasses
from ..registry import register


@dataclass(frozen=True)
class EigenShampooSettings(DampedSettings):
    """The one knob: the damping relative to the mean squared training gradient (as DataInf's)."""


def shampoo_factors(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i G_i G_i^T, sum_i G_i^T G_i)`` for ``[k, o, i]`` gradients (sums, not means), computed in
    their dtype (an eigenbasis needs no more) and returned in float64, in which chunks are summed."""
    o, i = rows.shape[1:]
    by_rows = rows.transpose(0, 1).reshape(o, -1)  # [o, k * i]
    by_columns = rows.reshape(-1, i)  # [k * o, i]
    return (by_rows @ by_rows.T).to(torch.float64), (by_columns.T @ by_columns).to(torch.float64)


def fit_eigens(
    chunks: Iterable[Mapping[str, torch.Tensor]],
    shapes: Mapping[str, tuple[int, int]],
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, KroneckerEigen]:
    """Each block's Shampoo eigenbasis and fitted eigenvalues from two passes over ``chunks``
    (re-iterable, each pass the same training rows): the factors, then the eigenvalues in their basis."""
    left = {name: torch.zeros(o, o, dtype=torch.float64, device=device) for name, (o, _) in shapes.items()}
    right = {name: torch.zeros(i, i, dtype=torch.float64, device=device) for name, (_, i) in shapes.items()}
    for chunk in chunks:
        for name, shape in shapes.items():
            l_part, r_part = shampoo_factors(chunk[name].to(device=device, dtype=dtype).reshape(-1, *shape))
            left[name] += l_part
            right[name] += r_part
    bases = {
        name: (torch.linalg.eigh(left[name])[1].to(dtype), torch.linalg.eigh(right[name])[1].to(dtype))
        for name in shapes
    }
    return fitted_eigenvalues(chunks, bases, shapes, rows, dtype, device)


@register
class EigenShampoo(InnerProductMethod):
    """Score = sum over blocks of ``(F_ES + lambda I)^-1 g_test . g_train`` in the Shampoo eigenbasis of
    the per-example gradients; HIGHER = the training example supports the test output more. Needs each
    block's matrix shape (:meth:`~..base.Method.bind_shapes`; the pipeline binds those its features
    record)."""

    name = "eshampoo"
    aliases = ("ekfac-example",)
    summary = (
        "eigenvalue-corrected Shampoo: the eigenbasis of the per-example gradient matrices' factors "
        "(sum G G^T, sum G^T G), eigenvalues refitted; not token-level K-FAC (alias: ekfac-example)"
    )
    Settings = EigenShampooSettings
    settings: EigenShampooSettings

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """``U [(U^T V W) / (Lambda + lambda)] W^T`` for every test row; two passes besides the statistics:
        the factors, then the eigenvalues in their eigenbasis."""
        names, dtype = live_blocks(train, test)
        if not names:
            return {}
        statistics = train.statistics()
        shapes = {
            name: matrix_shape(self.block_shapes, self.name, name, statistics[name].width) for name in names
        }
        device = test[names[0]].device
        eigens = fit_eigens(train, shapes, train.rows, dtype, device)
        return {
            name: eigen.apply(
                test[name].to(device=device, dtype=dtype),
                statistics[name].damping(self.settings.damping_scale),
                self.settings.chunk_size,
            )
            for name, eigen in eigens.items()
        }
