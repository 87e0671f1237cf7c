"""Detection metrics per test example: how well does a score row separate own-label training examples?

The study's accuracy and coverage (:mod:`.metrics`) look at the top-1 and top-k only. These metrics look
at the whole ranking, so two methods with equal accuracy can still be told apart:

- ``auc``: area under the ROC curve of relevant vs. other training examples, i.e. the probability that
  a random relevant example scores above a random other one, ties counting 1/2 (from average ranks, so
  it does not depend on tie order). NaN when a test has no relevant or no other training example.
- ``reciprocal_rank``: 1 / (1-based rank of the first relevant example); 0.0 when there is none.
- ``average_precision`` (AUPRC, as DATE-LM uses for detection): the mean, over relevant examples, of
  the precision at its rank. NaN when a test has no relevant training example.
- ``precision_at[k]``: share of the top-k that is relevant.

Scores are ``[n_test, n_train]``, HIGHER = the training example supports the test output more; a
training example is relevant to a test example when it has the test example's label. Rankings break
ties by lower training index (the stable order of :func:`.metrics.rank_training`), which affects
reciprocal rank, average precision and precision@k but not AUC. Everything is vectorised over tests:
one argsort of the whole matrix, then cumulative sums.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import DataError
from .metrics import _as_numpy, encode_labels, evaluate, rank_training


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays, whose == is elementwise
class RankingMetrics:
    """Per-test metric arrays (``[n_test]`` each); :meth:`summary` averages them."""

    hit: np.ndarray  # bool: top-1 training example has the test's label (the study's accuracy)
    coverage: np.ndarray  # float: share of the top-k with the test's label (the study's coverage)
    auc: np.ndarray  # float, NaN where undefined
    reciprocal_rank: np.ndarray  # float, 0.0 where no training example has the test's label
    average_precision: np.ndarray  # float, NaN where no training example has the test's label
    precision_at: dict[int, np.ndarray]  # k -> float
    k: int  # the coverage k

    def summary(self) -> dict[str, float]:
        """Means over test examples; AUC and AP skip undefined tests and count them when there are any."""
        result = {
            "n_test": float(len(self.hit)),
            "accuracy": _mean(self.hit.astype(np.float64)),
            "coverage": _mean(self.coverage),
            "k": float(self.k),
            "auc": _mean(self.auc),
            "mrr": _mean(self.reciprocal_rank),
            "map": _mean(self.average_precision),
        }
        result.update({f"precision@{k}": _mean(values) for k, values in sorted(self.precision_at.items())})
        for name, values in (("auc", self.auc), ("map", self.average_precision)):
            undefined = int(np.isnan(values).sum())
            if undefined:
                result[f"{name}_undefined"] = float(undefined)
        return result


def _mean(values: np.ndarray) -> float:
    """NaN-skipping mean that is NaN (without a warning) when nothing is left."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _average_ranks_descending(sorted_scores: np.ndarray) -> np.ndarray:
    """1-based rank per position of rows sorted best first, tied scores sharing their average rank."""
    n_test, n_train = sorted_scores.shape
    position = np.broadcast_to(np.arange(n_train), (n_test, n_train))
    differs = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    edge = np.ones((n_test, 1), dtype=bool)
    starts = np.concatenate([edge, differs], axis=1)
    ends = np.concatenate([differs, edge], axis=1)
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, position, n_train)[:, ::-1], axis=1)[:, ::-1]
    return (first + last) / 2.0 + 1.0


def ranking_metrics(
    scores: torch.Tensor | np.ndarray,
    train_labels: Sequence[Hashable],
    test_labels: Sequence[Hashable],
    k: int | None = None,
    precision_ks: Sequence[int] = (1, 10),
) -> RankingMetrics:
    """Per-test detection metrics of ``scores`` (``[n_test, n_train]``, HIGHER = more supportive).

    ``k`` is the coverage k (default: the study's ``n_train // n_classes``), passed to
    :func:`.metrics.evaluate` so hit and coverage are exactly the study's. Every ``precision_ks`` entry
    must lie in ``[1, n_train]``; a DataError says otherwise.
    """
    array = _as_numpy(scores)
    study = evaluate(array, train_labels, test_labels, k=k)  # also checks shapes and labels
    n_train = array.shape[1]
    bad = [size for size in precision_ks if not 1 <= size <= n_train]
    if bad:
        raise DataError(
            f"precision_ks must lie in [1, {n_train}] (the number of training examples), got {bad}"
        )
    train_codes, test_codes, _ = encode_labels(train_labels, test_labels)
    order = rank_training(array)  # [n_test, n_train], best first, ties by lower training index
    relevant = train_codes[order] == test_codes[:, None]  # relevance in ranked order
    hits = np.cumsum(relevant, axis=1)  # relevant examples among the top 1..n_train
    n_relevant = hits[:, -1].astype(np.float64)
    n_other = n_train - n_relevant
    ranks = np.arange(1, n_train + 1, dtype=np.float64)

    first = np.argmax(relevant, axis=1)
    reciprocal_rank = np.where(n_relevant > 0, 1.0 / (first + 1.0), 0.0)

    precision_sum = (relevant * (hits / ranks)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        average_precision = np.where(n_relevant > 0, precision_sum / n_relevant, np.nan)

        # Mann-Whitney U: ascending average ranks of the relevant examples, minus their minimum sum.
        descending = _average_ranks_descending(np.take_along_axis(array, order, axis=1))
        ascending_sum = (relevant * (n_train + 1.0 - descending)).sum(axis=1)
        u_statistic = ascending_sum - n_relevant * (n_relevant + 1.0) / 2.0
        defined = (n_relevant > 0) & (n_other > 0)
        auc = np.where(defined, u_statistic / (n_relevant * n_other), np.nan)

    return RankingMetrics(
        hit=study.per_test_hit,
        coverage=study.per_test_coverage,
        auc=auc,
        reciprocal_rank=reciprocal_rank,
        average_precision=average_precision,
        precision_at={size: hits[:, size - 1] / float(size) for size in precision_ks},
        k=study.k,
    )
