"""A run's features: per-example gradients and representations of its train and test examples, kept in
the run's feature store (``RUN/features``) under a key of everything that produced them, computed where
missing, under torchrun a slice of every shard per rank."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core import distributed
from ..core.settings import to_dict
from ..data.schema import Example, data_fingerprint
from ..data.templates import PromptSettings
from ..features.gradients import Features, GradientSettings, collect_features
from ..features.kronecker import KroneckerFactors
from ..features.ranks import collect_on_ranks, factors_on_ranks
from ..features.store import FeatureStore
from ..models.settings import ModelSettings
from ..models.tuning import checkpoint_fingerprint
from ..scoring.train_features import TrainFeatures
from .layout import features_dir
from .runs import LoadedRun

Timings = dict[str, float]


def split_fingerprint(
    identity: dict[str, Any],
    prompt: PromptSettings,
    examples: Sequence[Example],
    gradients: GradientSettings | None = None,
) -> dict[str, Any]:
    """Everything that produced one split's features: model, adapter, dtype, template, data content, and
    a random projection when there is one (the gradient batch size changes nothing)."""
    projection = gradients.fingerprint() if gradients is not None else {}
    return {**identity, "prompt": to_dict(prompt), "data": data_fingerprint(examples), **projection}


@dataclass(frozen=True)
class RunFeatures:
    """The features of one loaded run, with the template and gradient settings that make them."""

    loaded_run: LoadedRun
    prompt: PromptSettings
    gradients: GradientSettings
    model_settings: ModelSettings
    shard_size: int = 256
    kronecker: bool = False  # also keep the training split's token-level Kronecker factors (K-FAC, EK-FAC)

    @functools.cached_property
    def identity(self) -> dict[str, Any]:
        """What, besides data and template, determines the features: the model, what was trained (LoRA or
        full weights, and which blocks) and the trained weights."""
        base = self.loaded_run.base
        tuning = self.loaded_run.config.lora.tuning
        return {
            "model": base.spec,
            "source": base.source,
            "dtype": self.model_settings.dtype,
            # Only a full fine-tune says so: LoRA features stored before the option existed stay valid.
            **({"tuning": tuning} if tuning != "lora" else {}),
            "adapter_sha256": checkpoint_fingerprint(self.loaded_run.adapter),
        }

    def examples(self, split: str) -> Sequence[Example]:
        return self.loaded_run.task.train if split == "train" else self.loaded_run.task.test

    def store(self, split: str, examples: Sequence[Example] | None = None) -> FeatureStore:
        """The store of one split's features (of ``examples``, default: the run's split)."""
        examples = self.examples(split) if examples is None else examples
        fingerprint = split_fingerprint(self.identity, self.prompt, examples, self.gradients)
        return FeatureStore(features_dir(self.loaded_run.run), split, fingerprint, shard_size=self.shard_size)

    def keys(self) -> dict[str, str]:
        """Per split, the key (folder name) its features are stored under."""
        return {split: self.store(split).folder.name for split in ("train", "test")}

    def load(self, split: str) -> Features:
        """One split's features in memory, from the store when they were computed with these settings
        (with the training split's Kronecker factors when :attr:`kronecker` asks for them)."""
        if not self._wants_kronecker(split):
            return self.store(split).compute(self.examples(split), self._collector(split))
        factors = KroneckerFactors()
        features = self.store(split).compute(self.examples(split), self._collector(split, factors))
        features.kronecker = self._kronecker_after(factors)
        return features

    def stream(self, split: str) -> TrainFeatures:
        """One split's features stored (the missing shards computed, one at a time) and read back as
        passes over the store's shards: never all in memory."""
        examples = self.examples(split)
        store = self.store(split)
        if not self._wants_kronecker(split):
            store.ensure(examples, self._collector(split))
            return TrainFeatures.from_store(store, examples)
        factors = KroneckerFactors()
        store.ensure(examples, self._collector(split, factors))
        return TrainFeatures.from_store(store, examples, self._kronecker_after(factors))

    def kronecker_factors(self) -> KroneckerFactors:
        """The training split's token-level Kronecker factors: stored, or from one more pass over it (the
        per-example gradients it forms on the way are dropped, a shard at a time)."""
        store = self.store("train")
        found = store.stored_kronecker()
        if found is None:
            found = factors_on_ranks(self.examples("train"), self._accumulate_factors)
            store.put_kronecker(found)
        return found

    def _wants_kronecker(self, split: str) -> bool:
        return self.kronecker and split == "train"

    def _kronecker_after(self, gathered: KroneckerFactors) -> KroneckerFactors:
        """The factors once the split's shards are stored: those gathered while the shards were computed
        when every shard was computed now (the same pass), else the stored or a separate pass's."""
        store = self.store("train")
        if store.stored_kronecker() is None:
            if distributed.active():  # each rank gathered the factors of its slices of the shards
                parts = distributed.all_gather_object(gathered)
                gathered = functools.reduce(KroneckerFactors.merged, parts)
            if gathered.examples == len(self.examples("train")):
                store.put_kronecker(gathered)
                return gathered
        return self.kronecker_factors()

    def _accumulate_factors(self, examples: Sequence[Example], into: KroneckerFactors) -> None:
        for start in range(0, len(examples), self.shard_size):  # a shard's gradients in memory at a time
            collect_features(
                self.loaded_run.model,
                self.loaded_run.tokenizer,
                examples[start : start + self.shard_size],
                self.prompt,
                self.gradients,
                representations=False,
                desc="kronecker factors",
                weights=self.loaded_run.weights,
                kronecker=into,
            )

    def collect(self, examples: Sequence[Example], desc: str) -> Features:
        """Features of other examples (a query), with the run's model and settings; not stored."""
        model, tokenizer = self.loaded_run.model, self.loaded_run.tokenizer
        weights = self.loaded_run.weights
        return collect_features(
            model, tokenizer, examples, self.prompt, self.gradients, desc=desc, weights=weights
        )

    def in_memory(self) -> tuple[Features, Features, Timings]:
        """Train and test features in memory, with the seconds each took."""
        train, train_s = _timed(lambda: self.load("train"))
        test, test_s = _timed(lambda: self.load("test"))
        return train, test, {"features_train_s": train_s, "features_test_s": test_s}

    def streamed(self) -> tuple[TrainFeatures, Features, Timings]:
        """Training features as passes over the store, test features in memory, with the seconds each took."""
        train, train_s = _timed(lambda: self.stream("train"))
        test, test_s = _timed(lambda: self.load("test"))
        return train, test, {"features_train_s": train_s, "features_test_s": test_s}

    def _collector(
        self, split: str, kronecker: KroneckerFactors | None = None
    ) -> Callable[[Sequence[Example]], Features]:
        model, tokenizer = self.loaded_run.model, self.loaded_run.tokenizer
        collect = functools.partial(
            collect_features,
            model,
            tokenizer,
            prompt=self.prompt,
            settings=self.gradients,
            desc=f"{split} features",
            weights=self.loaded_run.weights,
            kronecker=kronecker,
        )
        # under torchrun each rank computes a slice of every shard (collect_on_ranks); rank 0 stores it
        return functools.partial(collect_on_ranks, collect=collect)


def _timed(work: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start
