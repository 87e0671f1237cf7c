"""Training features as repeatable passes over chunks: the feature store's shards, or row slices of
features held in memory. What the engine streams; their gradient blocks are :class:`TrainPasses`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..attribution.passes import TrainPasses
from ..features.gradients import Features
from ..features.kronecker import KroneckerFactors
from ..features.store import FeatureStore


@dataclass(frozen=True)
class TrainFeatures:
    """Training features as repeatable passes over chunks: each ``passes()`` call starts one pass."""

    passes: Callable[[], Iterator[Features]]
    chunks: int
    rows: int
    kronecker: KroneckerFactors | None = None  # the split's token-level factors, when a method asked
    texts: Sequence[str] | None = None  # each example's prompt and response, for text methods

    @classmethod
    def from_store(
        cls, store: FeatureStore, examples: Sequence[Any], kronecker: KroneckerFactors | None = None
    ) -> TrainFeatures:
        """The stored shards of a complete split, each read (and checked) when its turn comes."""
        chunks = -(-len(examples) // store.shard_size)
        texts = [e.text for e in examples]
        return cls(lambda: store.shards(examples), chunks, len(examples), kronecker, texts)

    def gradient_passes(self) -> TrainPasses:
        """The gradient blocks of these passes (statistics computed once, on first use)."""
        return TrainPasses(lambda: (f.blocks for f in self.passes()), self.chunks)
