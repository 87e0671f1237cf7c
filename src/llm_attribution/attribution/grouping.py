"""Blocks of equal width scored together: one batched matrix product (``bmm``) per few blocks.

A LoRA model has many small blocks of a few widths (the embedded model: 90 of width 2,304 and 30 of 768).
Products in bf16 need the training gradients rounded to bf16, which is a copy; stacking a few blocks of
equal width into that copy costs nothing more and lets one ``bmm`` spread the blocks over the cores. On the
2-core benchmark machine (AMX), a bf16 product of 100 test by 900 training rows of width 2,304 took 0.38 ms
per block alone, 0.26 ms per block in batches of 2 to 16, and 0.38 ms again in one batch of 90 (373 MB,
far beyond the caches, and freshly allocated memory has to be paged in). Hence small groups. In float32
the copy would cost more than batching gains (DataInf 0.65 s batched against 0.54 s one by one), so
float32 groups are single blocks, used in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

GROUP_ELEMENTS = 2**22
"""Most elements in one group's stacked training gradients (8 MiB in bf16), and in the ``[blocks,
test rows, train rows]`` partial products of one chunk pair: small enough to stay near the caches and to
be reused by the allocator from group to group, and it bounds the extra memory grouping takes."""


def width_groups(
    widths: Mapping[str, int], rows: int, chunk_rows: int, batched: bool, budget: int = GROUP_ELEMENTS
) -> list[list[str]]:
    """Block names split into groups scored by one batched product each, every name in exactly one group.

    Unbatched: one group per block, in the given order. Batched: blocks of equal width in order of first
    appearance, each group small enough that ``blocks x rows x width`` and ``blocks x chunk_rows^2`` stay
    within ``budget`` (at least one block per group).
    """
    if not batched:
        return [[name] for name in widths]
    by_width: dict[int, list[str]] = {}
    for name, width in widths.items():
        by_width.setdefault(width, []).append(name)
    groups: list[list[str]] = []
    for width, names in by_width.items():
        size = max(1, budget // max(rows * width, chunk_rows * chunk_rows, 1))
        groups.extend(names[start : start + size] for start in range(0, len(names), size))
    return groups


def stack_rows(blocks: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[len(blocks), rows, width]`` in ``dtype``: a view of a single block already in that dtype and
    device, else one copy (converting while copying, with no intermediate per block)."""
    first = blocks[0]
    if len(blocks) == 1 and first.dtype == dtype and first.device == device:
        return first.unsqueeze(0)
    out = torch.empty((len(blocks), *first.shape), dtype=dtype, device=device)
    for index, block in enumerate(blocks):
        out[index].copy_(block)
    return out
