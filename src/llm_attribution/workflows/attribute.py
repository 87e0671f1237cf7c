"""From a fine-tuned run to scored attributions: features (stored), every method's score matrix, metrics.

Scores follow one convention everywhere: HIGHER = the training example supports the test output MORE.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

if typing.TYPE_CHECKING:
    from .runs import Explained

from ..attribution.base import (
    GRADIENT,
    AttributionMethod,
    InnerProductMethod,
    Method,
    PartialScores,
    RepresentationMethod,
    get_method,
    method_class,
)
from ..core import distributed
from ..core.errors import ConfigError
from ..core.pause import pause_point
from ..core.settings import base_type, field_types, option, require, require_positive, to_dict
from ..core.storage import read_json, write_json_atomic
from ..core.versions import package_versions
from ..data.schema import Example, TaskData, data_fingerprint
from ..data.templates import PromptSettings
from ..diagnostics.ihvp import compare_ihvp, compare_transformed, inner_product_methods, summarize
from ..evaluation.metrics import Metrics, evaluate
from ..features.gradients import Features, GradientSettings, collect_features
from ..features.ranks import collect_sharded, score_sharded
from ..features.store import FeatureStore
from ..models.lora import adapter_fingerprint
from ..models.settings import ModelSettings
from ..scoring.store import ScoreStore, score_metadata, scores_path
from ..scoring.streamed import TrainFeatures, evaluate_file, score_to_file
from .layout import SETTINGS_FILE

log = logging.getLogger(__name__)

STUDY_METHODS = ("hessian-free", "datainf", "lissa", "exact", "repsim")


@dataclass(frozen=True)
class AttributeSettings:
    """Which methods score the run, with which options, on which epoch's adapter."""

    methods: tuple[str, ...] = option(
        STUDY_METHODS, "comma-separated attribution methods (higher score = supports the test output more)"
    )
    method_options: tuple[str, ...] = option(
        (), "comma-separated method.option=value, e.g. lissa.depth=200,datainf.damping_scale=0.05"
    )
    epoch: int | None = option(None, "explain the adapter saved after this epoch (default: the last)")
    shard_size: int = option(256, "examples per stored feature shard (the unit a crashed run resumes from)")
    score_checkpoint_minutes: float = option(
        5.0,
        "keep a method's partial scores (its sum over the LoRA blocks done) at most this often, for resuming "
        "a killed run (0: after every block); results do not depend on it",
        recorded=False,
    )
    stream: bool = option(
        False,
        "score with the training features read from the store shard by shard and each score file written "
        "as it is computed: memory independent of n_train (one process; a killed run rescores the method "
        "it was in, not from its last LoRA block)",
    )

    def __post_init__(self) -> None:
        require(len(self.methods) > 0, "--methods must name at least one method")
        require(len(set(self.methods)) == len(self.methods), "--methods lists a method twice")
        for name in self.methods:
            method_class(name)  # unknown names fail here, before any work
        parse_method_options(self.methods, self.method_options)
        require_positive("shard_size", self.shard_size)
        require(
            self.score_checkpoint_minutes >= 0 and self.score_checkpoint_minutes != float("inf"),
            f"--score-checkpoint-minutes must be >= 0, got {self.score_checkpoint_minutes!r}",
        )
        if self.epoch is not None:
            require_positive("epoch", self.epoch)

    def build_methods(self) -> dict[str, Method]:
        options = parse_method_options(self.methods, self.method_options)
        return {name: get_method(name, **options.get(name, {})) for name in self.methods}


def parse_method_options(methods: Sequence[str], items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["lissa.depth=200"]`` -> ``{"lissa": {"depth": 200}}``, typed by the method's settings."""
    parsed: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        name, dot, field = key.strip().rpartition(".")
        if not sep or not dot:
            raise ConfigError(f"--method-options: expected method.option=value, got {item!r}")
        if name not in methods:
            raise ConfigError(f"--method-options: {name!r} is not among --methods ({', '.join(methods)})")
        settings_cls = method_class(name).Settings
        hints = field_types(settings_cls)
        if field not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(settings_cls))
            raise ConfigError(f"--method-options: {name} has no option {field!r}; its options: {known}")
        parsed.setdefault(name, {})[field] = _typed(text.strip(), hints[field], item)
    return parsed


def _typed(text: str, hint: Any, item: str) -> Any:
    inner, optional = base_type(hint)
    if optional and text.lower() == "none":
        return None
    try:
        if inner is bool:
            return text.lower() in ("1", "true", "yes", "on")
        return inner(text) if inner in (int, float, str) else text
    except ValueError:
        kind = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"--method-options: {item!r} needs a {kind} value") from None


def collect_split(
    run: Path,
    split: str,
    examples: Sequence[Example],
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    identity: Mapping[str, Any],
    prompt: PromptSettings,
    gradients: GradientSettings,
    shard_size: int,
) -> Features:
    """Features of one split, from the store when they were computed with the same fingerprint."""
    store = FeatureStore(
        run, split, split_fingerprint(identity, prompt, examples, gradients), shard_size=shard_size
    )
    return store.compute(examples, _collector(model, tokenizer, prompt, gradients, split))


def stream_split(
    run: Path,
    split: str,
    examples: Sequence[Example],
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    identity: Mapping[str, Any],
    prompt: PromptSettings,
    gradients: GradientSettings,
    shard_size: int,
) -> TrainFeatures:
    """Features of one split stored (the missing shards computed, one at a time) and read back as passes
    over the store's shards: never all in memory."""
    fingerprint = split_fingerprint(identity, prompt, examples, gradients)
    store = FeatureStore(run, split, fingerprint, shard_size=shard_size)
    store.ensure(examples, _collector(model, tokenizer, prompt, gradients, split))
    return TrainFeatures.from_store(store, examples)


def _collector(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: PromptSettings,
    gradients: GradientSettings,
    split: str,
) -> Callable[[Sequence[Example]], Features]:
    collect = functools.partial(
        collect_features, model, tokenizer, prompt=prompt, settings=gradients, desc=f"{split} features"
    )
    # under torchrun each rank computes a slice of every shard (collect_sharded); rank 0 stores it
    return functools.partial(collect_sharded, collect=collect)


def split_fingerprint(
    identity: Mapping[str, Any],
    prompt: PromptSettings,
    examples: Sequence[Example],
    gradients: GradientSettings | None = None,
) -> dict[str, Any]:
    """Everything that produced one split's features: model, adapter, dtype, template, data content, and
    a random projection when there is one (the gradient batch size changes nothing)."""
    projection = gradients.fingerprint() if gradients is not None else {}
    return {**identity, "prompt": to_dict(prompt), "data": data_fingerprint(examples), **projection}


@dataclass
class MethodResult:
    """One method's score matrix (HIGHER = more supportive), its metrics and its cost."""

    name: str
    scores: torch.Tensor | None  # None when streamed: the matrix is in its file, not in memory
    metrics: Metrics
    seconds: float
    settings: dict[str, Any]


def score_features(method: Method, train: Features, test: Features) -> torch.Tensor:
    """``[n_test, n_train]`` scores of one method on stored features; HIGHER = more supportive."""
    if method.kind == GRADIENT:
        method.bind_shapes({**train.shapes, **test.shapes})
        return typing.cast(AttributionMethod, method).score(train.blocks, test.blocks)
    if train.representations is None or test.representations is None:
        raise ConfigError(f"{method.name} needs representations, which these features do not hold")
    return typing.cast(RepresentationMethod, method).score_representations(
        train.representations, test.representations
    )


def score_methods(
    methods: Mapping[str, Method], train: Features, test: Features, task: TaskData
) -> dict[str, MethodResult]:
    """Score every method and judge it with the study's accuracy and coverage."""
    train_labels = [e.label for e in task.train]
    test_labels = [e.label for e in task.test]
    results = {}
    for name, method in methods.items():
        start = time.perf_counter()
        scores = score_sharded(functools.partial(score_features, method, train), test)
        seconds = time.perf_counter() - start
        metrics = evaluate(scores, train_labels, test_labels)
        log.info("scored %s in %.2f s", name, seconds)
        results[name] = MethodResult(name, scores, metrics, seconds, to_dict(method.settings))
    return results


RESULTS_FILE = "results.json"


def _score_resumably(
    store: ScoreStore,
    key: dict[str, Any],
    method: Method,
    features: Mapping[str, Features],
    settings: AttributeSettings,
) -> tuple[torch.Tensor, float]:
    """One method's scores and the seconds they took; a gradient method keeps its running sum over blocks
    at most every ``settings.score_checkpoint_minutes`` and resumes from it (identical results)."""
    if not isinstance(method, InnerProductMethod):
        start = time.perf_counter()
        return score_features(method, features["train"], features["test"]), time.perf_counter() - start
    resumed = store.partial(method.name, key)
    partial, before = resumed if resumed is not None else (None, 0.0)
    start = last_save = time.perf_counter()

    def keep(running: PartialScores) -> None:
        nonlocal last_save
        pause_point("scores-block")
        if time.perf_counter() - last_save >= settings.score_checkpoint_minutes * 60.0:
            store.put_partial(method.name, key, running, before + time.perf_counter() - start)
            last_save = time.perf_counter()

    method.bind_shapes({**features["train"].shapes, **features["test"].shapes})
    scores = method.accumulate(features["train"].blocks, features["test"].blocks, partial, keep)
    return scores, before + time.perf_counter() - start


def _method_key(method: Method) -> dict[str, Any]:
    """What identifies a method's scores besides the features: its class and every one of its settings."""
    return {"class": type(method).__qualname__, "settings": to_dict(method.settings)}


def run_identity(explained: Explained, model_settings: ModelSettings) -> dict[str, Any]:
    """What, besides data and template, determines a run's features: the model and the adapter's weights."""
    return {
        "model": explained.loaded.spec,
        "source": explained.loaded.source,
        "dtype": model_settings.dtype,
        "adapter_sha256": adapter_fingerprint(explained.adapter),
    }


def collect_run_features(
    explained: Explained,
    prompt: PromptSettings,
    gradients: GradientSettings,
    model_settings: ModelSettings,
    shard_size: int = 256,
) -> tuple[dict[str, Features], dict[str, float]]:
    """Train and test features of a run's model (from the store when already computed), with timings."""
    identity = run_identity(explained, model_settings)
    timings: dict[str, float] = {}
    features = {}
    for split, examples in (("train", explained.task.train), ("test", explained.task.test)):
        start = time.perf_counter()
        features[split] = collect_split(
            explained.run,
            split,
            examples,
            explained.model,
            explained.tokenizer,
            identity,
            prompt,
            gradients,
            shard_size,
        )
        timings[f"features_{split}_s"] = time.perf_counter() - start
    return features, timings


@dataclass
class _Scoring:
    """What both scoring paths of :func:`attribute_explained` share: the run, its methods and their keys."""

    explained: Explained
    methods: dict[str, Method]
    store: ScoreStore
    keys: dict[str, dict[str, Any]]
    compared: dict[str, InnerProductMethod]
    ihvp_key: dict[str, Any]


ScoredMethods = tuple[dict[str, Any], dict[str, Any], dict[str, float]]
"""Per method its result (metrics, seconds, settings), the iHVP comparison, and feature timings."""


def _score_in_memory(
    context: _Scoring,
    settings: AttributeSettings,
    prompt: PromptSettings,
    gradients: GradientSettings,
    model_settings: ModelSettings,
) -> ScoredMethods:
    """Features in memory; a gradient method resumes after its last kept LoRA block; under torchrun each
    rank scores a slice of the test rows."""
    explained, methods, store, keys = context.explained, context.methods, context.store, context.keys
    compared, ihvp_key, task = context.compared, context.ihvp_key, explained.task
    cached = {name: store.cached(name, keys[name]) for name in methods}
    ihvp = store.cached_ihvp(ihvp_key) if compared else {}
    features: dict[str, Features] = {}
    timings: dict[str, float] = {}
    if ihvp is None or any(hit is None for hit in cached.values()):
        features, timings = collect_run_features(
            explained, prompt, gradients, model_settings, settings.shard_size
        )
    train_ids, test_ids = [e.id for e in task.train], [e.id for e in task.test]
    train_labels, test_labels = [e.label for e in task.train], [e.label for e in task.test]
    results = {}
    for name, method in methods.items():
        hit = cached[name]
        if hit is None:
            if distributed.active():  # each rank scores a slice of the test rows; rank 0 keeps them
                start = time.perf_counter()
                train = features["train"]
                scores = score_sharded(functools.partial(score_features, method, train), features["test"])
                seconds = time.perf_counter() - start
            else:
                scores, seconds = _score_resumably(store, keys[name], method, features, settings)
            log.info("scored %s in %.2f s", name, seconds)
            pause_point("scores-method")
            if distributed.is_main():
                store.put(name, keys[name], scores, seconds, to_dict(method.settings), train_ids, test_ids)
        else:
            scores, seconds = hit
        metrics = evaluate(scores, train_labels, test_labels)
        results[name] = MethodResult(name, scores, metrics, seconds, to_dict(method.settings))
    if ihvp is None and not distributed.is_main():
        ihvp = {}  # only rank 0 writes the record this feeds
    if ihvp is None:
        # How far each inverse-Fisher approximation is from exact (and exact from the raw gradient).
        per_block = compare_ihvp(
            features["train"].blocks,
            features["test"].blocks,
            compared,
            reference=typing.cast(InnerProductMethod, methods["exact"]),
        )
        ihvp = _summarize_ihvp(per_block)
        store.put_ihvp(ihvp_key, ihvp)
    return results, ihvp, timings


IHVP_TEST_ROWS = 20  # test rows the iHVP comparison uses (compare_ihvp's default)


def _summarize_ihvp(per_block: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Median, mean and max over blocks of each comparison, per method."""
    return {
        name: {key: summarize({b: c[key] for b, c in blocks.items()}) for key in next(iter(blocks.values()))}
        for name, blocks in per_block.items()
        if blocks
    }


def _score_streamed(
    context: _Scoring,
    settings: AttributeSettings,
    prompt: PromptSettings,
    gradients: GradientSettings,
    model_settings: ModelSettings,
) -> ScoredMethods:
    """Training features streamed from the store, each score file written column block by column block,
    metrics judged from the files a few rows at a time: memory independent of n_train."""
    explained, methods, store, keys = context.explained, context.methods, context.store, context.keys
    run, task = explained.run, explained.task
    cached = {name: store.cached_seconds(name, keys[name]) for name in methods}
    ihvp = store.cached_ihvp(context.ihvp_key) if context.compared else {}
    timings: dict[str, float] = {}
    if ihvp is None or any(seconds is None for seconds in cached.values()):
        train, test, timings = stream_run_features(
            explained, prompt, gradients, model_settings, settings.shard_size
        )
        passes = train.gradient_passes()  # one statistics pass shared by every method
    train_ids = [e.id for e in task.train]
    train_labels, test_labels = [e.label for e in task.train], [e.label for e in task.test]
    results: dict[str, Any] = {}
    transformed: dict[str, dict[str, torch.Tensor]] = {}
    for name, method in methods.items():
        seconds = cached[name]
        if seconds is None:
            start = time.perf_counter()
            metadata = score_metadata(name, to_dict(method.settings), train_ids, test.ids)
            kept = score_to_file(method, train, test, scores_path(run, name), metadata, passes)
            if kept is not None and name in context.compared:
                transformed[name] = {block: t[:IHVP_TEST_ROWS] for block, t in kept.items()}
            seconds = time.perf_counter() - start
            log.info("scored %s in %.2f s", name, seconds)
            pause_point("scores-method")
            store.put_file(name, keys[name], seconds)
        metrics = evaluate_file(scores_path(run, name), train_labels, test_labels)
        results[name] = MethodResult(name, None, metrics, seconds, to_dict(method.settings))
    if ihvp is None:
        for name, method in context.compared.items():  # methods whose scores were reused: transform again
            if name not in transformed:
                method.bind_shapes(test.shapes)
                full = method.transform_test_streamed(passes, test.blocks)
                transformed[name] = {block: t[:IHVP_TEST_ROWS] for block, t in full.items()}
        per_block = compare_transformed(transformed, test.blocks, reference="exact", max_test=IHVP_TEST_ROWS)
        ihvp = _summarize_ihvp(per_block)
        store.put_ihvp(context.ihvp_key, ihvp)
    return results, ihvp, timings


def stream_run_features(
    explained: Explained,
    prompt: PromptSettings,
    gradients: GradientSettings,
    model_settings: ModelSettings,
    shard_size: int = 256,
) -> tuple[TrainFeatures, Features, dict[str, float]]:
    """Training features stored (computed where missing, never all in memory) and read back as passes
    over shards; test features in memory; with timings."""
    identity = run_identity(explained, model_settings)
    model, tokenizer, task, run = explained.model, explained.tokenizer, explained.task, explained.run
    start = time.perf_counter()
    train = stream_split(run, "train", task.train, model, tokenizer, identity, prompt, gradients, shard_size)
    timings = {"features_train_s": time.perf_counter() - start}
    start = time.perf_counter()
    test = collect_split(run, "test", task.test, model, tokenizer, identity, prompt, gradients, shard_size)
    timings["features_test_s"] = time.perf_counter() - start
    return train, test, timings


def attribute_explained(
    explained: Explained,
    settings: AttributeSettings,
    prompt: PromptSettings,
    gradients: GradientSettings,
    model_settings: ModelSettings,
) -> dict[str, Any]:
    """Collect (or reuse) features of ``explained``, score every method, write scores and ``results.json``.

    Returns the results dict; methods scored before (by another call) are kept unless re-scored.
    """
    run, task = explained.run, explained.task
    identity = run_identity(explained, model_settings)
    feature_keys = {
        split: FeatureStore(run, split, split_fingerprint(identity, prompt, examples, gradients)).folder.name
        for split, examples in (("train", task.train), ("test", task.test))
    }
    methods = settings.build_methods()
    store = ScoreStore(run)
    keys = {name: {"features": feature_keys, "method": name, **_method_key(m)} for name, m in methods.items()}
    compared = inner_product_methods(methods, include_exact=True) if "exact" in methods else {}
    ihvp_key = {"features": feature_keys, **{name: _method_key(m) for name, m in compared.items()}}
    context = _Scoring(explained, methods, store, keys, compared, ihvp_key)
    if settings.stream and distributed.active():
        log.warning("--stream scores in one process; under torchrun the ranks score test rows in memory")
    score = _score_streamed if settings.stream and not distributed.active() else _score_in_memory
    results, ihvp, timings = score(context, settings, prompt, gradients, model_settings)
    adapter_sha256 = identity["adapter_sha256"]
    path = run / RESULTS_FILE
    record = read_json(path) if path.is_file() else {"methods": {}}
    if record.get("adapter_sha256") != adapter_sha256:
        record = {"methods": {}}  # scores of another adapter (epoch) must not be mixed in
    for name, result in results.items():
        score_path = scores_path(run, name)
        record["methods"][name] = {
            "accuracy": result.metrics.accuracy,
            "coverage": result.metrics.coverage,
            "k": result.metrics.k,
            "seconds": result.seconds,
            "settings": result.settings,
            "scores": str(score_path.relative_to(run)),
        }
        if name in ihvp:
            if name != "exact":
                record["methods"][name]["ihvp_relative_error_vs_exact"] = ihvp[name]["relative_error"]
            record["methods"][name]["ihvp_cosine"] = {
                "vs_exact": ihvp[name]["cosine_vs_exact"],
                "vs_gradient": ihvp[name]["cosine_vs_gradient"],
            }
    record.update(
        {
            "convention": "higher score = the training example supports the test output more",
            "task": task.name,
            "n_train": len(task.train),
            "n_test": len(task.test),
            "n_classes": len(task.labels),
            "adapter": str(explained.adapter),
            "adapter_sha256": adapter_sha256,
            "epoch": explained.epoch,
            "timings": timings,
            "settings": read_json(run / SETTINGS_FILE),
            "versions": package_versions(),
        }
    )
    distributed.on_main(write_json_atomic, path, record)
    return record
