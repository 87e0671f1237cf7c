"""The study's metrics: does a score matrix put training examples of the test example's class on top?

Given scores (``[n_test, n_train]``, HIGHER = more supportive) and a class label per example:

- accuracy: the share of test examples whose top-1 training example has the test example's label;
- coverage: with ``k = n_train // n_classes`` (``n_classes`` = distinct TRAINING labels; the official
  ``check_acc_cov`` takes ``int(n_train / n_classes)``), the share of each test example's top-k training
  examples with its label, averaged over test examples (equal to the official count over rows / (rows x k)).

Ties are broken by training index, lower first (a stable sort of the negated scores), so the metrics
are deterministic; the official code's ``argpartition`` leaves tie order unspecified.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import DataError


@dataclass(frozen=True)
class Metrics:
    """Accuracy and coverage over all test examples, and the per-test values they average."""

    accuracy: float
    coverage: float
    per_test_hit: np.ndarray  # bool [n_test]: top-1 training example has the test's label
    per_test_coverage: np.ndarray  # float [n_test]: share of the top-k with the test's label
    k: int


def _as_numpy(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    array = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    if array.ndim != 2:
        raise DataError(f"a score matrix must be 2-D [n_test, n_train], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"a score matrix must be numeric, got dtype {array.dtype}")
    if np.isnan(array).any():
        raise DataError("the score matrix contains NaN; rankings would be arbitrary")
    return array


def encode_labels(
    train_labels: Sequence[Hashable], test_labels: Sequence[Hashable]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer codes for both label lists (shared codebook) and the number of distinct training labels."""
    codebook: dict[Hashable, int] = {}
    train_codes = np.array(
        [codebook.setdefault(label, len(codebook)) for label in train_labels], dtype=np.int64
    )
    n_classes = len(codebook)
    test_codes = np.array(
        [codebook.setdefault(label, len(codebook)) for label in test_labels], dtype=np.int64
    )
    return train_codes, test_codes, n_classes


def rank_training(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[n_test, n_train]`` training indices, best first per test row; ties by lower training index."""
    array = _as_numpy(scores)
    return np.argsort(-array, axis=1, kind="stable")


def evaluate(
    scores: torch.Tensor | np.ndarray,
    train_labels: Sequence[Hashable],
    test_labels: Sequence[Hashable],
    k: int | None = None,
) -> Metrics:
    """Accuracy and coverage of ``scores`` (HIGHER = more supportive) against the labels.

    ``k`` defaults to the study's ``n_train // n_classes``; pass it to compare runs with other splits.
    """
    array = _as_numpy(scores)
    n_test, n_train = array.shape
    if len(train_labels) != n_train or len(test_labels) != n_test:
        raise DataError(
            f"score matrix is {n_test} x {n_train} but there are {len(test_labels)} test and "
            f"{len(train_labels)} training labels"
        )
    if n_train == 0:
        raise DataError("no training examples to rank")
    train_codes, test_codes, n_classes = encode_labels(train_labels, test_labels)
    if k is None:
        k = n_train // n_classes
    if not 1 <= k <= n_train:
        raise DataError(f"coverage k must be in [1, {n_train}], got {k}")
    per_test_hit, per_test_coverage = judge_rows(array, train_codes, test_codes, k)
    return Metrics(
        accuracy=float(per_test_hit.mean()) if n_test else float("nan"),
        coverage=float(per_test_coverage.mean()) if n_test else float("nan"),
        per_test_hit=per_test_hit,
        per_test_coverage=per_test_coverage,
        k=k,
    )


def judge_rows(
    scores: np.ndarray, train_codes: np.ndarray, test_codes: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per test row of ``scores``: whether its top-1 training example has its label code, and the share of
    its top-``k`` that do (ties by lower training index). Codes from :func:`encode_labels`."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    same = train_codes[top] == test_codes[:, None]  # [n_test, k]
    return same[:, 0].copy(), same.mean(axis=1)


def coverage_caps(train_labels: Sequence[Hashable], test_labels: Sequence[Hashable], k: int) -> np.ndarray:
    """Per test example, the highest coverage any ranking can reach: ``min(n_own, k) / k`` with ``n_own``
    the training examples of its label. On an imbalanced task it is far below 1 (20 harmful examples
    among 250 with k = 125 cap a harmful test at 0.16), so coverage is read against it."""
    train_codes, test_codes, _ = encode_labels(train_labels, test_labels)
    own = np.bincount(train_codes, minlength=int(test_codes.max(initial=0)) + 1)[test_codes]
    return np.minimum(own, k) / float(k)
