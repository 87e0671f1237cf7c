"""KNN-Shapley against the definition: Shapley values by enumerating every subset of a small training set
with the KNN utility, and the efficiency property (values sum to the full set's utility)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llm_attribution.attribution.registry import get_method
from llm_attribution.core.errors import ConfigError
from llm_attribution.evaluation.grid import noted_name
from llm_attribution.features.gradients import Features
from llm_attribution.features.ranks import slice_features
from llm_attribution.scoring.engine import score_features, stream_scores
from llm_attribution.scoring.train_features import TrainFeatures


def _utility(
    subset: tuple[int, ...], similarity: torch.Tensor, labels: list[str], label: str, k: int
) -> float:
    """(1/K) * the number of the subset's K most similar examples that carry ``label``."""
    nearest = sorted(subset, key=lambda i: (-float(similarity[i]), i))[:k]
    return sum(labels[i] == label for i in nearest) / k


def _brute_force(similarity: torch.Tensor, labels: list[str], label: str, k: int) -> list[float]:
    n = len(labels)
    values = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                gain = _utility((*subset, i), similarity, labels, label, k) - _utility(
                    subset, similarity, labels, label, k
                )
                total += weight * gain
        values.append(total)
    return values


def _features(n: int, seed: int, labels: list[str]) -> Features:
    reps = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed))
    return Features([f"e{i}" for i in range(n)], {}, reps, torch.zeros(n), labels=labels)


@pytest.mark.parametrize("k", [1, 3])
def test_equals_the_shapley_values_of_the_knn_utility(k: int) -> None:
    train = _features(7, 0, ["a", "b", "a", "a", "b", "c", "b"])
    test = _features(3, 1, ["a", "b", "c"])
    got = score_features(get_method("knn-shapley", neighbours=k), train, test).double()
    similarity = (
        F.normalize(test.representations.double(), dim=1)
        @ F.normalize(train.representations.double(), dim=1).T
    )
    for row, label in enumerate(test.labels):
        want = _brute_force(similarity[row], train.labels, label, k)
        assert got[row].tolist() == pytest.approx(want, abs=1e-6)
        full = _utility(tuple(range(7)), similarity[row], train.labels, label, k)
        assert float(got[row].sum()) == pytest.approx(full, abs=1e-6)  # efficiency


def test_streamed_and_sliced_equal_in_memory() -> None:
    train = _features(11, 2, list("abcabcabcab"))
    test = _features(4, 3, list("abca"))
    method = get_method("knn-shapley")
    whole = score_features(method, train, test)
    chunks = TrainFeatures(
        lambda: (slice_features(train, slice(s, s + 4)) for s in range(0, 11, 4)), 3, 11, labels=train.labels
    )
    assert torch.allclose(stream_scores(get_method("knn-shapley"), chunks, test), whole)
    part = score_features(get_method("knn-shapley"), train, slice_features(test, slice(2, 4)))
    assert torch.allclose(part, whole[2:4])
    assert noted_name("knn-shapley", method.notes()) == "knn-shapley (uses class labels)"


def test_without_labels_it_is_refused() -> None:
    train, test = _features(4, 0, list("abab")), _features(2, 1, list("ab"))
    train.labels = None
    with pytest.raises(ConfigError, match="needs the class labels"):
        score_features(get_method("knn-shapley"), train, test)
