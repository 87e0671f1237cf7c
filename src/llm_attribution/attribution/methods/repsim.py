"""RepSim: cosine similarity of representations (the study uses the last layer's hidden state at the
prompt's last token). Not an influence function; the study's strongest baseline on every task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.errors import DataError
from ..base import RepresentationMethod
from ..registry import register


@register
class RepSim(RepresentationMethod):
    """Score = ``cos(rep_test, rep_train)``; HIGHER = the training example supports the test output more."""

    name = "repsim"
    summary = "cosine similarity of the last hidden states (no gradients)"

    def score_representations(self, train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        """Float32 ``[n_test, n_train]`` cosine similarities (0 for an all-zero representation);
        HIGHER = the training example supports the test output more."""
        if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
            raise DataError(
                f"representations must be [examples, width] with equal widths, got {tuple(train.shape)} "
                f"and {tuple(test.shape)}"
            )
        if train.shape[0] == 0:
            raise DataError("no training representations")
        dtype = torch.promote_types(torch.promote_types(train.dtype, test.dtype), torch.float32)
        train_unit = F.normalize(train.to(dtype), dim=1)
        test_unit = F.normalize(test.to(dtype=dtype, device=train.device), dim=1)
        out = torch.empty(test.shape[0], train.shape[0], dtype=torch.float32, device=train.device)
        for rows in self.chunks(test.shape[0]):
            out[rows] = self.product(test_unit[rows], train_unit).to(torch.float32)
        return out
