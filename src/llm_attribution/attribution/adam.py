"""The optimizer-aware row maps LESS and TrackStar share: a training gradient's AdamW update from the
optimizer's state at a checkpoint, second-moment normalisation, and unit norms over several blocks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.errors import ConfigError
from ..models.moments import OptimizerMoments


def moments_of(moments: OptimizerMoments | None, block: str, width: int, method: str) -> tuple[int, int]:
    """Check that ``moments`` cover ``block`` with ``width`` numbers per row (ConfigError otherwise)."""
    if moments is None:
        raise ConfigError(f"{method} needs the optimizer's moments, and none were bound to it")
    if block not in moments.second:
        raise ConfigError(f"{method}: the optimizer's moments have no block {block!r}")
    if moments.second[block].shape[0] != width:
        raise ConfigError(
            f"{method} preconditions each number of a gradient with the optimizer's moments, so it needs "
            f"unprojected gradients (block {block} has {width} numbers per row, the optimizer "
            f"{moments.second[block].shape[0]})"
        )
    return moments.steps[block], width


def adam_update(moments: OptimizerMoments, block: str, rows: torch.Tensor) -> torch.Tensor:
    """Each row's AdamW update direction if it were the next step's gradient: ``m_hat / (sqrt(v_hat) +
    eps)`` with ``m = b1 m + (1 - b1) g`` and ``v = b2 v + (1 - b2) g^2`` from the saved state, bias
    corrected for step ``t + 1`` (weight decay left out: it does not depend on the example)."""
    b1, b2, eps = moments.beta1, moments.beta2, moments.eps
    step = moments.steps[block] + 1
    g = rows.double()
    first = b1 * moments.first[block].double().to(g.device) + (1 - b1) * g
    second = b2 * moments.second[block].double().to(g.device) + (1 - b2) * g * g
    update = (first / (1 - b1**step)) / ((second / (1 - b2**step)).sqrt() + eps)
    return update.to(rows.dtype)


def second_moment_normalised(moments: OptimizerMoments, block: str, rows: torch.Tensor) -> torch.Tensor:
    """``g / (sqrt(v_hat) + eps)``: each coordinate in units of its typical gradient size (TrackStar)."""
    scale = moments.corrected_second(block).double().to(rows.device).sqrt() + moments.eps
    return (rows.double() / scale).to(rows.dtype)


def unit_rows(blocks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows divided by their norm over all of ``blocks`` together (a zero row stays zero)."""
    squares = sum((b.double() ** 2).sum(dim=1) for b in blocks.values())
    norms = torch.as_tensor(squares).sqrt()
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return {name: (b.double() / norms[:, None].to(b.device)).to(b.dtype) for name, b in blocks.items()}
