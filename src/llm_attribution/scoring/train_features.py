"""Training features as repeatable passes over chunks: the feature store's shards, or row slices of
features held in memory. What the engine streams; their gradient blocks are :class:`TrainPasses`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..attribution.passes import TrainPasses
from ..features.checkpoints import stack_checkpoints, stack_moments
from ..features.gradients import Features
from ..features.kronecker import KroneckerFactors
from ..features.store import FeatureStore
from ..models.moments import OptimizerMoments


@dataclass(frozen=True)
class TrainFeatures:
    """Training features as repeatable passes over chunks: each ``passes()`` call starts one pass."""

    passes: Callable[[], Iterator[Features]]
    chunks: int
    rows: int
    kronecker: KroneckerFactors | None = None  # the split's token-level factors, when a method asked
    texts: Sequence[str] | None = None  # each example's prompt and response, for text methods
    learning_rates: dict[int, float] | None = None  # stacked checkpoints' mean learning rates (TracIn)
    moments: OptimizerMoments | None = None  # AdamW's moments at the checkpoint(s) (LESS, TrackStar)
    labels: Sequence[str] | None = None  # each example's class label (KNN-Shapley)

    @classmethod
    def from_store(
        cls, store: FeatureStore, examples: Sequence[Any], kronecker: KroneckerFactors | None = None
    ) -> TrainFeatures:
        """The stored shards of a complete split, each read (and checked) when its turn comes."""
        chunks = -(-len(examples) // store.shard_size)
        texts, labels = [e.text for e in examples], [e.label for e in examples]
        return cls(lambda: store.shards(examples), chunks, len(examples), kronecker, texts, labels=labels)

    @classmethod
    def stacked(
        cls, per_epoch: Mapping[int, TrainFeatures], learning_rates: Mapping[int, float]
    ) -> TrainFeatures:
        """Several checkpoints' passes read side by side, chunk by chunk, each chunk's features stacked
        (:func:`~..features.checkpoints.stack_checkpoints`); the splits must be chunked alike."""
        epochs = sorted(per_epoch)
        last = per_epoch[epochs[-1]]
        if any((per_epoch[e].chunks, per_epoch[e].rows) != (last.chunks, last.rows) for e in epochs):
            raise ValueError("the checkpoints' training features are not chunked alike")

        def passes() -> Iterator[Features]:
            for chunks in zip(*(per_epoch[e].passes() for e in epochs), strict=True):
                yield stack_checkpoints(dict(zip(epochs, chunks, strict=True)), learning_rates)

        rates = {e: float(learning_rates[e]) for e in epochs}
        moments = stack_moments({e: per_epoch[e].moments for e in epochs})
        return cls(passes, last.chunks, last.rows, None, last.texts, rates, moments, last.labels)

    def gradient_passes(self) -> TrainPasses:
        """The gradient blocks of these passes (statistics computed once, on first use)."""
        return TrainPasses(lambda: (f.blocks for f in self.passes()), self.chunks)
