"""A run's features: per-example gradients and representations of its train and test examples, kept in
the run's feature store (``RUN/features``) under a key of everything that produced them, computed where
missing, under torchrun a slice of every shard per rank."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..attribution.base import REPLAY, Method
from ..core import distributed
from ..core.errors import ConfigError
from ..core.settings import to_dict
from ..data.schema import Example, data_fingerprint
from ..data.templates import Encoded, PromptSettings
from ..features.captured import Capture
from ..features.checkpoints import stack_checkpoints
from ..features.gradients import Features, GradientSettings, collect_features
from ..features.kronecker import KroneckerFactors
from ..features.ranks import collect_on_ranks, factors_on_ranks
from ..features.store import FeatureStore
from ..features.tokens import TokenRows, token_features
from ..models.finetune import epoch_learning_rates
from ..models.moments import OptimizerMoments, load_moments
from ..models.settings import ModelSettings
from ..models.tuning import checkpoint_fingerprint
from ..scoring.train_features import TrainFeatures
from .layout import adapter_dir, features_dir, saved_epochs
from .runs import LoadedRun, select_epoch

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
    # every saved epoch's features up to the run's, stacked (TracIn); each epoch's stored under its own key
    checkpoints: bool = False
    # the methods that need AdamW's moments at the checkpoint(s) (LESS, TrackStar); empty: none does
    moments: tuple[str, ...] = ()

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
        if self._capture(split) is not None:  # captured rows never mix with collected ones: a store apart
            fingerprint["captured_sha256"] = self._capture_sha256
        return FeatureStore(features_dir(self.loaded_run.run), split, fingerprint, shard_size=self.shard_size)

    def keys(self) -> dict[str, str]:
        """Per split, the key (folder name) its features are stored under (stacked checkpoints: each
        epoch's, joined by ``+``)."""
        if self.checkpoints:
            epochs = [self._at(epoch).keys() for epoch in self.checkpoint_epochs()]
            return {split: "+".join(keys[split] for keys in epochs) for split in ("train", "test")}
        return {split: self.store(split).folder.name for split in ("train", "test")}

    def with_checkpoints(self) -> RunFeatures:
        """The same features for methods that sum over the training trajectory: every saved epoch's."""
        return dataclasses.replace(self, checkpoints=True, kronecker=False)

    def checkpoint_epochs(self) -> list[int]:
        """The saved epochs up to the run's (stacked when :attr:`checkpoints`)."""
        epoch = self.loaded_run.epoch
        if epoch is None:
            raise ConfigError(
                "tracin needs the adapter saved after every epoch; a run of a given --adapter has only one"
            )
        return [e for e in saved_epochs(self.loaded_run.run) if e <= epoch]

    def learning_rates(self) -> dict[int, float]:
        """Each stacked epoch's mean learning rate, from the run's schedule."""
        rates = epoch_learning_rates(self.loaded_run.config.train, len(self.examples("train")))
        return {epoch: rates[epoch] for epoch in self.checkpoint_epochs()}

    def _at(self, epoch: int) -> RunFeatures:
        """The features of one saved epoch (the model's weights untouched: for keys and stored features)."""
        run = dataclasses.replace(
            self.loaded_run, adapter=adapter_dir(self.loaded_run.run, epoch), epoch=epoch
        )
        return dataclasses.replace(self, loaded_run=run, checkpoints=False, kronecker=False)

    def _per_checkpoint(self, work: Callable[[RunFeatures], Any]) -> dict[int, Any]:
        """``work`` on each saved epoch's features, that epoch's weights loaded into the model for it; the
        run's own weights are loaded back after."""
        current, done = self.loaded_run, {}
        try:
            for epoch in self.checkpoint_epochs():
                current = select_epoch(current, epoch)
                done[epoch] = work(
                    dataclasses.replace(self, loaded_run=current, checkpoints=False, kronecker=False)
                )
        finally:
            select_epoch(current, self.loaded_run.epoch)
        return done

    def load(self, split: str) -> Features:
        """One split's features in memory, from the store when they were computed with these settings
        (with the training split's Kronecker factors when :attr:`kronecker` asks for them)."""
        if self.checkpoints:
            return stack_checkpoints(self._per_checkpoint(lambda f: f.load(split)), self.learning_rates())
        if not self._wants_kronecker(split):
            return self._with_moments(self.store(split).compute(self.examples(split), self._collector(split)))
        factors = KroneckerFactors()
        features = self.store(split).compute(self.examples(split), self._collector(split, factors))
        features.kronecker = self._kronecker_after(factors)
        return self._with_moments(features)

    def stream(self, split: str) -> TrainFeatures:
        """One split's features stored (the missing shards computed, one at a time) and read back as
        passes over the store's shards: never all in memory."""
        if self.checkpoints:
            return TrainFeatures.stacked(
                self._per_checkpoint(lambda f: f.stream(split)), self.learning_rates()
            )
        examples = self.examples(split)
        store = self.store(split)
        if not self._wants_kronecker(split):
            store.ensure(examples, self._collector(split))
            streamed = TrainFeatures.from_store(store, examples)
        else:
            factors = KroneckerFactors()
            store.ensure(examples, self._collector(split, factors))
            streamed = TrainFeatures.from_store(store, examples, self._kronecker_after(factors))
        return dataclasses.replace(streamed, moments=self.optimizer_moments()) if self.moments else streamed

    def kronecker_factors(self) -> KroneckerFactors:
        """The training split's token-level Kronecker factors: stored, or from one more pass over it (the
        per-example gradients it forms on the way are dropped, a shard at a time)."""
        store = self.store("train")
        found = store.stored_kronecker()
        if found is None:
            found = factors_on_ranks(self.examples("train"), self._accumulate_factors)
            store.put_kronecker(found)
        return found

    def optimizer_moments(self) -> OptimizerMoments:
        """AdamW's moments saved with the run's epoch checkpoint (ConfigError when it has none)."""
        found = load_moments(self.loaded_run.adapter)
        if found is None:
            raise ConfigError(
                f"{', '.join(self.moments)} needs the optimizer's moments saved with each epoch, and "
                f"{self.loaded_run.adapter} has none (fine-tuned by an older version or outside this tool): "
                "fine-tune the run again into a new --out"
            )
        return found

    def _with_moments(self, features: Features) -> Features:
        if self.moments:
            features.moments = self.optimizer_moments()
        return features

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
        if self.checkpoints:
            return stack_checkpoints(
                self._per_checkpoint(lambda f: f.collect(examples, desc)), self.learning_rates()
            )
        model, tokenizer = self.loaded_run.model, self.loaded_run.tokenizer
        weights = self.loaded_run.weights
        return self._with_moments(
            collect_features(
                model, tokenizer, examples, self.prompt, self.gradients, desc=desc, weights=weights
            )
        )

    def collect_tokens(self, example: Example) -> tuple[Features, TokenRows]:
        """Per-token features of one example (:mod:`~..features.tokens`): each labelled token's share of
        its gradient, with the run's model and settings (every checkpoint's, stacked, when
        :attr:`checkpoints`); not stored."""
        if self.checkpoints:
            parts = self._per_checkpoint(lambda f: f.collect_tokens(example))
            rows = next(iter(parts.values()))[1]
            return stack_checkpoints({e: p[0] for e, p in parts.items()}, self.learning_rates()), rows
        run = self.loaded_run

        def collect(examples: list[Example], encoded: list[Encoded]) -> Features:
            return collect_features(
                run.model,
                run.tokenizer,
                examples,
                self.prompt,
                self.gradients,
                representations=False,
                desc="answer tokens",
                weights=run.weights,
                encoded=encoded,
            )

        features, rows = token_features(example, run.tokenizer, self.prompt, collect)
        return self._with_moments(features), rows

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

    def _capture(self, split: str) -> Capture | None:
        """The gradient capture the run's training features come from (``--captured``), if any."""
        return self._opened_capture if split == "train" else None

    @functools.cached_property
    def _capture_sha256(self) -> str:
        assert self._opened_capture is not None
        return self._opened_capture.sha256()

    @functools.cached_property
    def _opened_capture(self) -> Capture | None:
        # Opened, checked and hashed once: store() and the collector both ask, and a capture is large.
        if self.loaded_run.captured is None:
            return None
        capture = Capture.open(self.loaded_run.captured)
        if capture.projection != self.gradients.fingerprint():
            wanted = capture.projection.get("projection", {}).get("dim")
            raise ConfigError(
                f"the gradient capture was made with projection {wanted or 'none'}; pass the same "
                f"--projection-dim{'' if wanted is None else f' {wanted}'} (and --projection-seed) to read it"
            )
        return capture

    def _collector(
        self, split: str, kronecker: KroneckerFactors | None = None
    ) -> Callable[[Sequence[Example]], Features]:
        model, tokenizer = self.loaded_run.model, self.loaded_run.tokenizer
        capture = self._capture(split)
        if capture is not None:
            if kronecker is not None:
                raise ConfigError(
                    "kfac and ekfac gather token-level factors in a collection pass, which a gradient "
                    "capture replaces; score them on a run without --captured"
                )
            return functools.partial(capture.features, tokenizer=tokenizer, prompt=self.prompt)
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


def by_trajectory(methods: Mapping[str, Method]) -> list[dict[str, Method]]:
    """The methods in groups scored on the same features: those of the run's adapter, then those that
    sum over every checkpoint (``needs_checkpoints``), then those that replay the run itself and read no
    features (:func:`is_replay`); empty groups left out."""
    groups = [
        {name: m for name, m in methods.items() if not m.needs_checkpoints and m.kind != REPLAY},
        {name: m for name, m in methods.items() if m.needs_checkpoints},
        {name: m for name, m in methods.items() if m.kind == REPLAY},
    ]
    return [group for group in groups if group]


def is_replay(group: Mapping[str, Method]) -> bool:
    """Whether a group of :func:`by_trajectory` replays the fine-tuning run (MAGIC) instead of reading
    features."""
    return any(m.kind == REPLAY for m in group.values())


def features_for(features: RunFeatures, group: Mapping[str, Method]) -> RunFeatures:
    """The features a group of :func:`by_trajectory` is scored on: with every checkpoint stacked, and
    with the optimizer's moments, when a method of the group needs them."""
    used = features.with_checkpoints() if any(m.needs_checkpoints for m in group.values()) else features
    moments = tuple(name for name, m in group.items() if m.needs_moments)
    return dataclasses.replace(used, moments=moments) if moments != used.moments else used


def _timed(work: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start
