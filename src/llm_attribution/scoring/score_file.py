"""A score matrix written as it is computed: a float32 safetensors file filled one block of columns at a
time (streamed scoring never holds the whole matrix), and judged from the file a few test rows at a time.
Scores: HIGHER = the training example supports the test output more.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ..core.errors import DataError, RunError
from ..core.storage import atomic_file
from ..evaluation.metrics import Metrics, encode_labels, evaluate, judge_rows

EVALUATION_BYTES = 1 << 20  # bytes of score rows judged at a time (bounds the sort's memory)


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
