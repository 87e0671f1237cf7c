"""The scoring engine: features -> every method's score matrix, kept in a :class:`~.store.ScoreStore`.

Each method is written once (:meth:`~llm_attribution.attribution.base.InnerProductMethod.transform_test`
over training passes); the engine runs it on one of two schedules, and both give the same scores:

- **in memory** (:func:`score_in_memory`): train and test features loaded; a gradient method scores a
  group of LoRA blocks at a time, its running sum kept every few minutes so a killed run resumes after its
  last kept group; under torchrun each rank scores a slice of the test rows;
- **streamed** (:func:`score_streamed`): the training features read from the feature store shard by shard,
  each score file written column block by column block, metrics judged from the file: memory does not
  grow with n_train.

A method's scores are reused when the store holds them under the same key (the features' fingerprints and
the method's class and settings) with an intact checksum. Beside the scores, the engine measures how far
each inverse-Fisher approximation is from ``exact`` on the first test rows (when ``exact`` is scored).
Scores everywhere: HIGHER = the training example supports the test output more.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..attribution.base import (
    InnerProductMethod,
    Method,
    PartialScores,
    RepresentationMethod,
    TextMethod,
)
from ..attribution.passes import TrainPasses
from ..core import distributed
from ..core.errors import ConfigError
from ..core.pause import pause_point
from ..core.progress import progress
from ..core.settings import to_dict
from ..diagnostics.ihvp import compare_ihvp, compare_transformed, inner_product_methods, summarize
from ..evaluation.metrics import Metrics, evaluate
from ..features.gradients import Features
from ..features.ranks import score_on_ranks
from .score_file import ScoreFile, evaluate_file
from .store import ScoreStore, score_metadata
from .train_features import TrainFeatures

log = logging.getLogger(__name__)

IHVP_TEST_ROWS = 20  # test rows the iHVP comparison uses (compare_ihvp's default)


@dataclass
class MethodResult:
    """One method's scores (HIGHER = more supportive), where they are kept, its metrics and its cost."""

    name: str
    scores: torch.Tensor | None  # None when streamed: the matrix is in its file, not in memory
    path: Path
    metrics: Metrics
    seconds: float
    settings: dict[str, Any]


def method_key(method: Method) -> dict[str, Any]:
    """What identifies a method's scores besides the features: its class and every one of its settings."""
    return {"class": type(method).__qualname__, "settings": to_dict(method.settings)}


@dataclass(frozen=True)
class ScoringJob:
    """What scoring a set of methods needs besides the features: where the scores are kept, the key of
    the features they are computed from, the examples' ids and labels, and how often to keep a partial
    sum."""

    methods: Mapping[str, Method]
    store: ScoreStore
    features_key: Mapping[str, Any]
    train_ids: Sequence[str]
    test_ids: Sequence[str]
    train_labels: Sequence[Any]
    test_labels: Sequence[Any]
    checkpoint_minutes: float = 5.0

    @functools.cached_property
    def compared(self) -> dict[str, InnerProductMethod]:
        """The methods whose iHVP is compared with exact's (none without exact, the reference)."""
        return inner_product_methods(self.methods, include_exact=True) if "exact" in self.methods else {}

    def key(self, name: str) -> dict[str, Any]:
        """The key ``name``'s stored scores must have to be reused."""
        return {"features": dict(self.features_key), "method": name, **method_key(self.methods[name])}

    @property
    def ihvp_key(self) -> dict[str, Any]:
        return {
            "features": dict(self.features_key),
            "in_span": True,  # comparisons stored before the in-span numbers existed are made again
            **{name: method_key(m) for name, m in self.compared.items()},
        }

    def cached_ihvp(self) -> dict[str, Any] | None:
        """The stored iHVP comparison ({} when there is none to make), or None when it must be made."""
        return self.store.cached_ihvp(self.ihvp_key) if self.compared else {}

    def keep(self, name: str, scores: torch.Tensor, seconds: float) -> None:
        """Store one method's freshly computed scores with its settings and notes (rank 0 only)."""
        log.info("scored %s in %.2f s", name, seconds)
        pause_point("scores-method")
        if distributed.is_main():
            method = self.methods[name]
            self.store.put(
                name,
                self.key(name),
                scores,
                seconds,
                to_dict(method.settings),
                self.train_ids,
                self.test_ids,
                method.notes(),
            )

    def result(
        self, name: str, scores: torch.Tensor | None, metrics: Metrics, seconds: float
    ) -> MethodResult:
        method = self.methods[name]
        return MethodResult(name, scores, self.store.path(name), metrics, seconds, to_dict(method.settings))


ScoredMethods = tuple[dict[str, MethodResult], dict[str, Any]]
"""Per method its result, and the iHVP comparison (per method: median, mean and max over blocks)."""


# ------------------------------------------------------------------------------------- one method, in memory


def bind(method: Method, test: Features, train: Features | TrainFeatures | None = None) -> Method:
    """Tell ``method`` what the features know besides the gradient rows: each block's matrix shape and,
    for a method that needs them, the training split's Kronecker factors or the stacked checkpoints'
    learning rates."""
    shapes = train.shapes if isinstance(train, Features) else {}
    method.bind_shapes({**shapes, **test.shapes})
    if method.needs_kronecker:
        method.bind_kronecker(None if train is None else train.kronecker)
    if method.needs_checkpoints:
        method.bind_learning_rates(test.learning_rates if train is None else train.learning_rates)
    if method.needs_moments:
        method.bind_moments(test.moments if train is None else train.moments)
    return method


def score_features(method: Method, train: Features, test: Features) -> torch.Tensor:
    """``[n_test, n_train]`` scores of one method on features in memory; HIGHER = more supportive."""
    if isinstance(method, InnerProductMethod):
        bind(method, test, train)
        return method.score(train.blocks, test.blocks)
    if isinstance(method, TextMethod):
        return method.score_texts(_texts(method, train), _texts(method, test))
    if method.needs_labels:
        method.bind_labels(train.labels, test.labels)
    return _representation_method(method).score_representations(
        _representations(method, train), _representations(method, test)
    )


def score_resumably(
    method: Method,
    train: Features,
    test: Features,
    store: ScoreStore,
    key: dict[str, Any],
    checkpoint_minutes: float,
) -> tuple[torch.Tensor, float]:
    """One method's scores and the seconds they took; a gradient method keeps its running sum over groups
    of blocks at most every ``checkpoint_minutes`` and resumes from it (identical results)."""
    if not isinstance(method, InnerProductMethod):
        start = time.perf_counter()
        return score_features(method, train, test), time.perf_counter() - start
    resumed = store.partial(method.name, key)
    partial, before = resumed if resumed is not None else (None, 0.0)
    start = last_save = time.perf_counter()

    def keep(running: PartialScores) -> None:
        nonlocal last_save
        pause_point("scores-block")
        if time.perf_counter() - last_save >= checkpoint_minutes * 60.0:
            store.put_partial(method.name, key, running, before + time.perf_counter() - start)
            last_save = time.perf_counter()

    bind(method, test, train)
    scores = method.score(train.blocks, test.blocks, partial, keep)
    return scores, before + time.perf_counter() - start


# -------------------------------------------------------------------------------------- one method, streamed


def score_chunks(
    method: Method, train: TrainFeatures, test: Features, passes: TrainPasses | None = None
) -> tuple[dict[str, torch.Tensor] | None, Iterator[torch.Tensor]]:
    """The transformed test gradients of a gradient method (None for others) and, lazily, the float32
    ``[n_test, n_chunk]`` scores of each training chunk in order (HIGHER = more supportive).

    The transform's passes run now; the scoring pass runs as the chunks are consumed. ``passes`` shares
    one statistics pass among several methods (default: a fresh one over ``train``)."""
    if isinstance(method, TextMethod):
        return None, _text_chunks(method, train, test)
    if not isinstance(method, InnerProductMethod):
        return None, _representation_chunks(_representation_method(method), train, test)
    bind(method, test, train)
    return method.stream(passes or train.gradient_passes(), test.blocks)


def score_to_file(
    method: Method,
    train: TrainFeatures,
    test: Features,
    path: Path,
    metadata: Mapping[str, str],
    passes: TrainPasses | None = None,
) -> dict[str, torch.Tensor] | None:
    """Score one method into ``path``, one block of columns per training chunk; returns its transformed
    test gradients (gradient methods; None for others)."""
    with ScoreFile(path, len(test.ids), train.rows, metadata) as out:
        transformed, chunks = score_chunks(method, train, test, passes)
        column = 0
        for block in chunks:
            out.write_columns(column, block)
            column += block.shape[1]
    return transformed


def stream_scores(method: Method, train: TrainFeatures, test: Features) -> torch.Tensor:
    """Float32 ``[n_test, n_train]`` scores in memory, ``train`` streamed (for a few test rows, e.g. one
    query); HIGHER = the training example supports the test output more."""
    _, chunks = score_chunks(method, train, test)
    return torch.cat(list(chunks), dim=1)


def _representation_method(method: Method) -> RepresentationMethod:
    if not isinstance(method, RepresentationMethod):
        raise ConfigError(f"{method.name} is neither a gradient nor a representation method")
    return method


def _representations(method: Method, features: Features) -> torch.Tensor:
    if features.representations is None:
        raise ConfigError(f"{method.name} needs representations, which these features do not hold")
    if not getattr(method, "with_gradients", False):
        return features.representations
    if features.representation_gradients is None:
        raise ConfigError(f"{method.name} needs representation gradients, which these features do not hold")
    return torch.cat([features.representations, features.representation_gradients], dim=1)


def _texts(method: Method, features: Features | TrainFeatures) -> Sequence[str]:
    if features.texts is None:
        raise ConfigError(f"{method.name} needs the examples' texts, which these features do not hold")
    return features.texts


def _text_chunks(method: TextMethod, train: TrainFeatures, test: Features) -> Iterator[torch.Tensor]:
    """A text method's scores, one training chunk's columns at a time (computed whole: a lexical index
    over every training text is small beside gradients, and its IDF needs the whole corpus)."""
    scores = method.score_texts(_texts(method, train), _texts(method, test))
    width = -(-train.rows // max(train.chunks, 1))
    for start in range(0, train.rows, width):
        yield scores[:, start : start + width]


def _representation_chunks(
    method: RepresentationMethod, train: TrainFeatures, test: Features
) -> Iterator[torch.Tensor]:
    test_representations = _representations(method, test)
    if method.needs_labels:  # its values couple the training examples: all representations at once
        chunks = list(progress(train.passes(), desc=method.name, total=train.chunks))
        method.bind_labels(train.labels, test.labels)
        whole = method.score_representations(
            torch.cat([_representations(method, f) for f in chunks]), test_representations
        )
        start = 0
        for features in chunks:
            yield whole[:, start : start + len(features.ids)]
            start += len(features.ids)
        return
    for features in progress(train.passes(), desc=method.name, total=train.chunks):
        yield method.score_chunk(_representations(method, features), test_representations)


# ---------------------------------------------------------------------------------- every method of a job


def score_in_memory(job: ScoringJob, load: Callable[[], tuple[Features, Features]]) -> ScoredMethods:
    """Every method of ``job`` with the features in memory (``load`` is called only when some scores or
    the iHVP comparison are not in the store); a gradient method resumes after its last kept group of
    blocks; under torchrun each rank scores a slice of the test rows and rank 0 keeps the scores."""
    store, methods = job.store, job.methods
    cached = {name: store.cached(name, job.key(name)) for name in methods}
    ihvp = job.cached_ihvp()
    train = test = None
    if ihvp is None or any(hit is None for hit in cached.values()):
        train, test = load()
    results = {}
    for name, method in methods.items():
        hit = cached[name]
        if hit is None:
            assert train is not None and test is not None
            if distributed.active():  # each rank scores a slice of the test rows; rank 0 keeps them
                start = time.perf_counter()
                scores = score_on_ranks(functools.partial(score_features, method, train), test)
                seconds = time.perf_counter() - start
            else:
                scores, seconds = score_resumably(
                    method, train, test, store, job.key(name), job.checkpoint_minutes
                )
            job.keep(name, scores, seconds)
        else:
            scores, seconds = hit
        metrics = evaluate(scores, job.train_labels, job.test_labels)
        results[name] = job.result(name, scores, metrics, seconds)
    if ihvp is None and not distributed.is_main():
        ihvp = {}  # only rank 0 writes the record this feeds
    if ihvp is None:
        assert train is not None and test is not None
        # How far each inverse-Fisher approximation is from exact (and exact from the raw gradient). A method
        # whose scores were reused was never bound to the blocks' shapes, which EK-FAC needs.
        for method in job.compared.values():
            bind(method, test, train)
        per_block = compare_ihvp(
            train.blocks, test.blocks, job.compared, reference=job.compared["exact"], max_test=IHVP_TEST_ROWS
        )
        ihvp = summarize_ihvp(per_block)
        store.put_ihvp(job.ihvp_key, ihvp)
    return results, ihvp


def score_streamed(job: ScoringJob, load: Callable[[], tuple[TrainFeatures, Features]]) -> ScoredMethods:
    """Every method of ``job`` with the training features streamed (``load`` is called only when needed),
    each score file written as it is computed and judged from the file: memory independent of n_train."""
    store, methods = job.store, job.methods
    cached = {name: store.cached_seconds(name, job.key(name)) for name in methods}
    ihvp = job.cached_ihvp()
    passes: TrainPasses | None = None
    if ihvp is None or any(seconds is None for seconds in cached.values()):
        train, test = load()
        passes = train.gradient_passes()  # one statistics pass shared by every method
    results = {}
    transformed: dict[str, dict[str, torch.Tensor]] = {}
    for name, method in methods.items():
        seconds = cached[name]
        if seconds is None:
            start = time.perf_counter()
            metadata = score_metadata(name, to_dict(method.settings), job.train_ids, test.ids)
            kept = score_to_file(method, train, test, store.path(name), metadata, passes)
            if kept is not None and name in job.compared:
                transformed[name] = {block: t[:IHVP_TEST_ROWS] for block, t in kept.items()}
            seconds = time.perf_counter() - start
            log.info("scored %s in %.2f s", name, seconds)
            pause_point("scores-method")
            store.put_file(name, job.key(name), seconds, method.notes())
        metrics = evaluate_file(store.path(name), job.train_labels, job.test_labels)
        results[name] = job.result(name, None, metrics, seconds)
    if ihvp is None:
        assert passes is not None
        for name, method in job.compared.items():  # methods whose scores were reused: transform again
            if name not in transformed:
                bind(method, test, train)
                full = method.transform_test(passes, test.blocks)
                transformed[name] = {block: t[:IHVP_TEST_ROWS] for block, t in full.items()}
        per_block = compare_transformed(
            transformed, test.blocks, reference="exact", max_test=IHVP_TEST_ROWS, train=passes
        )
        ihvp = summarize_ihvp(per_block)
        store.put_ihvp(job.ihvp_key, ihvp)
    return results, ihvp


def summarize_ihvp(per_block: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Median, mean and max over blocks of each comparison, per method."""
    return {
        name: {key: summarize({b: c[key] for b, c in blocks.items()}) for key in next(iter(blocks.values()))}
        for name, blocks in per_block.items()
        if blocks
    }


def judge_methods(
    methods: Mapping[str, Method],
    train: Features,
    test: Features,
    train_labels: Sequence[Any],
    test_labels: Sequence[Any],
) -> dict[str, Metrics]:
    """Every method scored in memory, nothing stored (under torchrun each rank scores a slice of the test
    rows), and judged with the study's accuracy and coverage."""
    judged = {}
    for name, method in methods.items():
        start = time.perf_counter()
        scores = score_on_ranks(functools.partial(score_features, method, train), test)
        log.info("scored %s in %.2f s", name, time.perf_counter() - start)
        judged[name] = evaluate(scores, train_labels, test_labels)
    return judged
