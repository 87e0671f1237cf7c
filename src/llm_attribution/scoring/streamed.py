"""Streamed scoring: test features in memory, training features read chunk by chunk, scores written as
they come. Peak memory does not grow with n_train (what each method holds and how many passes it reads
is tabled in :mod:`llm_attribution.attribution.passes`).

Each method's ``[n_test, n_train]`` matrix goes straight into its ``scores/<method>.safetensors`` file,
one block of columns per training chunk (the file is laid out and renamed into place when complete), and
its metrics are computed from the file a few test rows at a time. Scores: HIGHER = the training example
supports the test output more.
"""

from __future__ import annotations

import json
import os
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ..attribution.base import GRADIENT, AttributionMethod, InnerProductMethod, Method, RepresentationMethod
from ..attribution.passes import TrainPasses
from ..core.errors import ConfigError, DataError, RunError
from ..core.progress import progress
from ..core.settings import to_dict
from ..core.storage import atomic_file
from ..evaluation.metrics import Metrics, encode_labels, evaluate, judge_rows
from ..features.gradients import Features
from ..features.store import FeatureStore
from .store import score_metadata

EVALUATION_BYTES = 1 << 20  # bytes of score rows judged at a time (bounds the sort's memory)


@dataclass(frozen=True)
class TrainFeatures:
    """Training features as repeatable passes over chunks: each ``passes()`` call starts one pass."""

    passes: Callable[[], Iterator[Features]]
    chunks: int
    rows: int

    @classmethod
    def from_store(cls, store: FeatureStore, examples: Sequence[Any]) -> TrainFeatures:
        """The stored shards of a complete split, each read (and checked) when its turn comes."""
        return cls(lambda: store.shards(examples), -(-len(examples) // store.shard_size), len(examples))

    @classmethod
    def from_features(cls, features: Features, chunk_size: int) -> TrainFeatures:
        """Row slices of features held in memory."""
        n = len(features.ids)
        starts = range(0, n, chunk_size)

        def passes() -> Iterator[Features]:
            for s in starts:
                reps = features.representations
                yield Features(
                    features.ids[s : s + chunk_size],
                    {k: v[s : s + chunk_size] for k, v in features.blocks.items()},
                    None if reps is None else reps[s : s + chunk_size],
                    features.losses[s : s + chunk_size],
                    features.shapes,
                )

        return cls(passes, len(starts), n)

    def gradient_passes(self) -> TrainPasses:
        """The gradient blocks of these passes (statistics computed once, on first use)."""
        return TrainPasses(lambda: (f.blocks for f in self.passes()), self.chunks)


class ScoreFile:
    """A float32 ``[n_test, n_train]`` safetensors file filled one block of columns at a time.

    The header is written first and each column block lands at its rows' offsets, so no more than one
    block is ever in memory; the file is renamed into place only when every column has been written.
    """

    def __init__(self, path: Path, n_test: int, n_train: int, metadata: Mapping[str, str]) -> None:
        self.path, self.n_test, self.n_train = path, n_test, n_train
        header = {
            "__metadata__": dict(metadata),
            "scores": {"dtype": "F32", "shape": [n_test, n_train], "data_offsets": [0, 4 * n_test * n_train]},
        }
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # the format allows space padding; it aligns the data to 8 bytes
        self._header = len(raw).to_bytes(8, "little") + raw
        self._written = 0
        self._context = atomic_file(path)

    def __enter__(self) -> ScoreFile:
        self._fd = self._context.__enter__()
        _pwrite(self._fd, self._header, 0)
        os.ftruncate(self._fd, len(self._header) + 4 * self.n_test * self.n_train)
        return self

    def write_columns(self, start: int, block: torch.Tensor) -> None:
        """Scores of training examples ``start, start + 1, ...`` for every test row."""
        rows = block.detach().to(device="cpu", dtype=torch.float32).numpy().astype("<f4", copy=False)
        if rows.shape[0] != self.n_test or start + rows.shape[1] > self.n_train:
            raise RunError(f"{self.path}: a score block of shape {rows.shape} does not fit at column {start}")
        for i, row in enumerate(rows):
            _pwrite(self._fd, row.tobytes(), len(self._header) + 4 * (i * self.n_train + start))
        self._written += rows.shape[1]

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None and self._written != self.n_train:
            error = RunError(
                f"{self.path}: {self._written} training columns scored, {self.n_train} expected; the "
                "feature store does not match the training examples"
            )
            self._context.__exit__(RunError, error, None)
            raise error
        self._context.__exit__(kind, error, trace)  # renames into place, or removes on an error


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def evaluate_file(path: Path, train_labels: Sequence[Any], test_labels: Sequence[Any]) -> Metrics:
    """The study's metrics of a score file, judged a few test rows at a time (equal to judging it whole)."""
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    entry = header.get("scores", {})
    if entry.get("dtype") != "F32" or len(entry.get("shape", ())) != 2:
        raise DataError(f"{path}: not a float32 score matrix")
    n_test, n_train = entry["shape"]
    if (n_test, n_train) != (len(test_labels), len(train_labels)):
        raise DataError(
            f"{path}: {n_test} x {n_train} scores for {len(test_labels)} x {len(train_labels)} labels"
        )
    train_codes, test_codes, n_classes = encode_labels(train_labels, test_labels)  # once: n labels
    k = n_train // max(n_classes, 1)
    if n_test == 0 or not 1 <= k <= n_train:
        return evaluate(np.zeros((n_test, n_train), dtype=np.float32), train_labels, test_labels)
    step = max(1, EVALUATION_BYTES // (4 * n_train))
    hits, coverage = [], []
    for start in range(0, n_test, step):
        rows = min(step, n_test - start)
        block = np.fromfile(path, dtype="<f4", count=rows * n_train, offset=8 + size + 4 * start * n_train)
        if np.isnan(block).any():
            raise DataError(f"{path}: the score matrix contains NaN; rankings would be arbitrary")
        hit, cover = judge_rows(
            block.reshape(rows, n_train), train_codes, test_codes[start : start + rows], k
        )
        hits.append(hit)
        coverage.append(cover)
    hit_all, coverage_all = np.concatenate(hits), np.concatenate(coverage)
    return Metrics(float(hit_all.mean()), float(coverage_all.mean()), hit_all, coverage_all, k)


@dataclass
class StreamedResult:
    """One method's score file (HIGHER = more supportive), its metrics and cost, and (for inverse-Fisher
    methods) its transformed test gradients on the first few test rows, for the iHVP diagnostics."""

    name: str
    path: Path
    metrics: Metrics
    seconds: float
    settings: dict[str, Any]
    transformed: dict[str, torch.Tensor] | None


def stream_methods(
    methods: Mapping[str, Method],
    train: TrainFeatures,
    test: Features,
    folder: Path,
    train_labels: Sequence[Any],
    test_labels: Sequence[Any],
    train_ids: Sequence[str],
    keep_transformed: int = 20,
) -> dict[str, StreamedResult]:
    """Score every method into ``folder/<method>.safetensors`` with ``train`` streamed, and judge it."""
    gradients = train.gradient_passes()  # shared: the statistics pass is made once for every method
    results = {}
    for name, method in methods.items():
        start = time.perf_counter()
        path = folder / f"{name}.safetensors"
        metadata = score_metadata(name, to_dict(method.settings), train_ids, test.ids)
        transformed = score_to_file(method, train, test, path, metadata, gradients)
        seconds = time.perf_counter() - start
        kept = None
        if transformed is not None and keep_transformed:
            kept = {block: t[:keep_transformed].clone() for block, t in transformed.items()}
        metrics = evaluate_file(path, train_labels, test_labels)
        results[name] = StreamedResult(name, path, metrics, seconds, to_dict(method.settings), kept)
    return results


def score_to_file(
    method: Method,
    train: TrainFeatures,
    test: Features,
    path: Path,
    metadata: Mapping[str, str],
    gradients: TrainPasses | None = None,
) -> dict[str, torch.Tensor] | None:
    """Score one method into ``path``, one block of columns per training chunk; returns its transformed
    test gradients (inner-product methods; None for others). See :func:`score_chunks` for ``gradients``."""
    with ScoreFile(path, len(test.ids), train.rows, metadata) as out:
        transformed, chunks = score_chunks(method, train, test, gradients)
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


def score_chunks(
    method: Method, train: TrainFeatures, test: Features, gradients: TrainPasses | None = None
) -> tuple[dict[str, torch.Tensor] | None, Iterator[torch.Tensor]]:
    """The transformed test gradients of an inner-product method (None for others) and, lazily, the
    ``[n_test, n_chunk]`` scores of each training chunk in order (HIGHER = more supportive).

    The transform's passes run now; the scoring pass runs as the chunks are consumed. ``gradients``
    shares one statistics pass among several methods (default: a fresh one over ``train``)."""
    if method.kind != GRADIENT:
        return None, _representation_chunks(typing.cast(RepresentationMethod, method), train, test)
    gradients = gradients or train.gradient_passes()
    method.bind_shapes(test.shapes)
    if not isinstance(method, InnerProductMethod):
        # A method without a streamed form: its training gradients are gathered (memory grows with n).
        parts = list(gradients)
        blocks = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        return None, iter([typing.cast(AttributionMethod, method).score(blocks, test.blocks)])
    transformed = method.transform_test_streamed(gradients, test.blocks)
    dtype = gradients.compute_dtype(test.blocks)
    n_test = len(test.ids)
    return transformed, (method.score_chunk(transformed, chunk, n_test, dtype) for chunk in gradients)


def _representation_chunks(
    method: RepresentationMethod, train: TrainFeatures, test: Features
) -> Iterator[torch.Tensor]:
    if test.representations is None:
        raise ConfigError(f"{method.name} needs representations, which these features do not hold")
    for features in progress(train.passes(), desc=method.name, total=train.chunks):
        if features.representations is None:
            raise ConfigError(f"{method.name} needs representations, which these features do not hold")
        yield method.score_chunk(features.representations, test.representations)
