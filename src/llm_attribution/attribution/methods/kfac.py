"""K-FAC and EK-FAC with token-level factors, as kronfluence, dattri-llm and Bergson compute them.

Each LoRA matrix's Fisher is approximated by ``S (x) A``: ``A`` the covariance of the matrix's input over
the tokens that carry a gradient to it (as dattri-llm; kronfluence and Bergson take every non-padding
token), ``S`` the covariance of the gradient at its output, summed over an example's tokens and
averaged over examples (:mod:`~llm_attribution.features.kronecker`; collected in the same pass as the
per-example gradients, by hooks). With ``S = U diag(s) U^T`` and ``A = W diag(a) W^T``:

- ``kfac``: eigenvalues ``s_j a_k`` (Martens & Grosse, 2015), so the damped inverse is
  ``U [(U^T V W) / (s a^T + lambda)] W^T``;
- ``ekfac``: the same basis with the eigenvalues refitted to the per-example gradients,
  ``Lambda_jk = (1/n) sum_i (U^T G_i W)_jk^2`` (George et al., 2018), one more pass over them.

Both are exact where the Kronecker assumption holds (one token per example and one input shared by all:
``F = S (x) u u^T``), as the tests check against ``exact``. The damping is the study's, for every method
alike: ``lambda = damping_scale * mean squared training gradient`` per block. ``eshampoo`` (formerly
``ekfac-example``) uses factors of the per-example gradient matrices instead and needs no hooks.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...core.errors import ConfigError
from ..base import DampedSettings, GradientBlocks, InnerProductMethod, live_blocks
from ..eigenbasis import KroneckerEigen, fitted_eigenvalues, matrix_shape, symmetric_eigen
from ..passes import TrainPasses
from ..registry import register


@dataclass(frozen=True)
class KfacSettings(DampedSettings):
    """The one knob: the damping relative to the mean squared training gradient (as every damped method)."""


Spectra = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
"""Block -> ``(s, U, a, W)``: each token-level factor's eigenvalues and eigenvectors."""
Shapes = Mapping[str, tuple[int, int]]


class TokenKronecker(InnerProductMethod):
    """What K-FAC and EK-FAC share: the token-level factors' eigenbases, the study's damping, the
    preconditioned test gradients. A subclass says which eigenvalues the basis gets."""

    needs_kronecker = True
    Settings = KfacSettings
    settings: KfacSettings

    def spectra(self, names: list[str], shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype) -> Spectra:
        """Each block's factor eigendecompositions, checked against the block's matrix shape."""
        factors = self.kronecker
        if factors is None:
            raise ConfigError(
                f"{self.name} needs the training split's token-level Kronecker factors, which these "
                "features do not hold: score it through a run (llm-attr run, attribute or explain), "
                "which collects them with the gradients"
            )
        found: Spectra = {}
        for name in names:
            outputs, inputs = factors.covariances(name)
            if (outputs.shape[0], inputs.shape[0]) != shapes[name]:
                raise ConfigError(
                    f"block {name}: Kronecker factors of shape {tuple(outputs.shape)} and "
                    f"{tuple(inputs.shape)} do not fit its {shapes[name]} gradient; collect the features "
                    "again"
                )
            found[name] = (*symmetric_eigen(outputs, dtype), *symmetric_eigen(inputs, dtype))
        return found

    @abstractmethod
    def eigens(
        self, train: TrainPasses, spectra: Spectra, shapes: Shapes, device: torch.device
    ) -> dict[str, KroneckerEigen]:
        """Each block's eigenbasis with the eigenvalues this method gives it."""

    def preconditioners(
        self, train: TrainPasses, test: GradientBlocks
    ) -> tuple[dict[str, KroneckerEigen], dict[str, float], torch.dtype]:
        """Each live block's eigenbasis with this method's eigenvalues, its damping, and the compute dtype."""
        names, dtype = live_blocks(train, test)
        if not names:
            return {}, {}, dtype
        statistics = train.statistics()
        shapes = {
            name: matrix_shape(self.block_shapes, self.name, name, statistics[name].width) for name in names
        }
        device = test[names[0]].device
        spectra = {
            name: tuple(t.to(device) for t in parts)
            for name, parts in self.spectra(names, shapes, dtype).items()
        }
        eigens = self.eigens(train, spectra, shapes, device)  # type: ignore[arg-type]
        damping = {name: statistics[name].damping(self.settings.damping_scale) for name in names}
        return eigens, damping, dtype

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """``U [(U^T V W) / (Lambda + lambda)] W^T`` for every test row, in the token-level basis."""
        eigens, damping, dtype = self.preconditioners(train, test)
        return {
            name: eigen.apply(test[name].to(dtype=dtype), damping[name], self.settings.chunk_size)
            for name, eigen in eigens.items()
        }


@register
class Kfac(TokenKronecker):
    """Score = sum over blocks of ``(S (x) A + lambda I)^-1 g_test . g_train`` with token-level factors;
    HIGHER = the training example supports the test output more."""

    name = "kfac"
    summary = (
        "K-FAC: damped inverse of S (x) A, the token-level covariances of each LoRA matrix's output "
        "gradient and input (no extra pass over the gradients)"
    )

    def eigens(
        self, train: TrainPasses, spectra: Spectra, shapes: Shapes, device: torch.device
    ) -> dict[str, KroneckerEigen]:
        return {name: KroneckerEigen(u, w, torch.outer(s, a)) for name, (s, u, a, w) in spectra.items()}


@register
class Ekfac(TokenKronecker):
    """Score = sum over blocks of ``(F_EK + lambda I)^-1 g_test . g_train``: the token-level K-FAC basis
    with eigenvalues refitted to the per-example gradients; HIGHER = the training example supports the
    test output more."""

    name = "ekfac"
    summary = (
        "EK-FAC: the token-level K-FAC eigenbasis with eigenvalues refitted to the per-example "
        "gradients (one more pass over them)"
    )

    def eigens(
        self, train: TrainPasses, spectra: Spectra, shapes: Shapes, device: torch.device
    ) -> dict[str, KroneckerEigen]:
        bases = {name: (u, w) for name, (_, u, _, w) in spectra.items()}
        dtype = next(iter(bases.values()))[0].dtype
        return fitted_eigenvalues(train, bases, shapes, train.rows, dtype, device)
