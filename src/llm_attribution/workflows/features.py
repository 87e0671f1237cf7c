"""A run's features: per-example gradients and representations of its train and test examples, kept in
the run's feature store (``RUN/features``) under a key of everything that produced them, computed where
missing, under torchrun a slice of every shard per rank."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.settings import to_dict
from ..data.schema import Example, data_fingerprint
from ..data.templates import PromptSettings
from ..features.gradients import Features, GradientSettings, collect_features
from ..features.ranks import collect_on_ranks
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
        """One split's features in memory, from the store when they were computed with these settings."""
        return self.store(split).compute(self.examples(split), self._collector(split))

    def stream(self, split: str) -> TrainFeatures:
        """One split's features stored (the missing shards computed, one at a time) and read back as
        passes over the store's shards: never all in memory."""
        examples = self.examples(split)
        store = self.store(split)
        store.ensure(examples, self._collector(split))
        return TrainFeatures.from_store(store, examples)

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

    def _collector(self, split: str) -> Callable[[Sequence[Example]], Features]:
        model, tokenizer = self.loaded_run.model, self.loaded_run.tokenizer
        collect = functools.partial(
            collect_features,
            model,
            tokenizer,
            prompt=self.prompt,
            settings=self.gradients,
            desc=f"{split} features",
            weights=self.loaded_run.weights,
        )
        # under torchrun each rank computes a slice of every shard (collect_on_ranks); rank 0 stores it
        return functools.partial(collect_on_ranks, collect=collect)


def _timed(work: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start
