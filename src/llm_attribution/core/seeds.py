"""Reproducible seeds derived from names, so that results do not depend on the order work is done in."""

from __future__ import annotations

import zlib


def block_seed(seed: int, block_name: str, repeat: int) -> int:
    """A reproducible per-(block, repeat) seed, independent of block order and of test chunking."""
    return (seed * 1_000_003 + zlib.crc32(block_name.encode()) * 101 + repeat) % (2**63)
