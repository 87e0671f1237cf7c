"""Per-test detection metrics: a hand-worked example with ties, and naive reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_attribution.core.errors import DataError
from llm_attribution.evaluation.metrics import evaluate
from llm_attribution.evaluation.ranking import ranking_metrics

TRAIN = ["a", "a", "b", "b", "c", "c"]  # 3 classes -> coverage k = 2
SCORES = np.array(
    [
        [1, 1, 5, 5, 0, 0],  # a: ranked 2 3 0 1 4 5 -> rel 0 0 1 1 0 0; AUC 4/8
        [0, 2, 2, 1, 0, 0],  # b: ranked 1 2 3 0 4 5 -> rel 0 1 1 0 0 0; AUC (3.5 + 3)/8
        [0, 0, 0, 0, 0, 0.5],  # c: ranked 5 0 1 2 3 4 -> rel 1 0 0 0 0 1; AUC (4 + 2)/8
        [9, 0, 0, 0, 0, 9],  # a: ranked 0 5 1 2 3 4 -> rel 1 0 1 0 0 0; AUC (3.5 + 1.5)/8
    ],
    dtype=np.float32,
)
TEST = ["a", "b", "c", "a"]


def test_hand_worked_example_with_ties() -> None:
    metrics = ranking_metrics(SCORES, TRAIN, TEST, precision_ks=(1, 3))
    assert metrics.auc.tolist() == [0.5, 0.8125, 0.75, 0.625]
    assert metrics.reciprocal_rank == pytest.approx([1 / 3, 1 / 2, 1, 1])
    assert metrics.average_precision == pytest.approx(
        [(1 / 3 + 2 / 4) / 2, (1 / 2 + 2 / 3) / 2, (1 + 2 / 6) / 2, (1 + 2 / 3) / 2]
    )
    assert metrics.precision_at[1].tolist() == [0, 0, 1, 1]
    assert metrics.precision_at[3] == pytest.approx([1 / 3, 2 / 3, 1 / 3, 2 / 3])
    study = evaluate(SCORES, TRAIN, TEST)
    assert metrics.k == study.k == 2
    assert np.array_equal(metrics.hit, study.per_test_hit)
    assert np.array_equal(metrics.coverage, study.per_test_coverage)
    summary = metrics.summary()
    assert summary["auc"] == 0.671875 and summary["mrr"] == pytest.approx(17 / 24)
    assert summary["map"] == pytest.approx(0.625) and summary["precision@3"] == pytest.approx(0.5)
    assert summary["accuracy"] == 0.5 and summary["coverage"] == 0.375 and summary["n_test"] == 4
    assert "auc_undefined" not in summary and "map_undefined" not in summary


def test_undefined_auc_and_ap_are_nan_and_counted() -> None:
    scores = torch.tensor([[0.2, 0.1, 0.3], [0.2, 0.1, 0.3]])  # torch input is accepted
    metrics = ranking_metrics(scores, ["x", "x", "x"], ["x", "y"], precision_ks=(2,))
    assert metrics.auc[0] != metrics.auc[0] and metrics.auc[1] != metrics.auc[1]  # no other / no relevant
    assert metrics.average_precision[0] == 1.0 and np.isnan(metrics.average_precision[1])
    assert metrics.reciprocal_rank.tolist() == [1.0, 0.0]
    assert metrics.precision_at[2].tolist() == [1.0, 0.0]
    summary = metrics.summary()
    assert np.isnan(summary["auc"]) and summary["auc_undefined"] == 2
    assert summary["map"] == 1.0 and summary["map_undefined"] == 1 and summary["mrr"] == 0.5


@pytest.mark.parametrize("ks", [(0,), (1, 7)])
def test_precision_k_out_of_range_is_a_data_error(ks: tuple[int, ...]) -> None:
    with pytest.raises(DataError, match="precision_ks"):
        ranking_metrics(SCORES, TRAIN, TEST, precision_ks=ks)


def test_shape_mismatch_is_a_data_error() -> None:
    with pytest.raises(DataError, match="4 x 6"):
        ranking_metrics(SCORES, TRAIN, TEST[:3])


@st.composite
def problems(draw: st.DrawFn, ties: bool | None = None) -> tuple[np.ndarray, list[int], list[int]]:
    n_train = draw(st.integers(1, 20))
    n_test = draw(st.integers(1, 6))
    n_classes = draw(st.integers(1, 4))
    train = draw(st.lists(st.integers(0, n_classes - 1), min_size=n_train, max_size=n_train))
    test = draw(st.lists(st.integers(0, n_classes), min_size=n_test, max_size=n_test))  # may be unseen
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tied = draw(st.booleans()) if ties is None else ties
    scores = rng.integers(0, 3, (n_test, n_train)) if tied else rng.standard_normal((n_test, n_train))
    return scores.astype(np.float64), train, test


def naive_auc(row: np.ndarray, relevant: np.ndarray) -> float:
    pairs = [(r, o) for r in row[relevant] for o in row[~relevant]]
    if not pairs:
        return float("nan")
    return sum(1.0 if r > o else 0.5 if r == o else 0.0 for r, o in pairs) / len(pairs)


def naive_ranked_relevance(row: np.ndarray, relevant: np.ndarray) -> list[bool]:
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))  # best first, ties by lower index
    return [bool(relevant[j]) for j in order]


def naive_ap(ranked: list[bool]) -> float:
    precisions = [sum(ranked[: i + 1]) / (i + 1) for i, rel in enumerate(ranked) if rel]
    return sum(precisions) / len(precisions) if precisions else float("nan")


@settings(max_examples=80, deadline=None)
@given(problems())
def test_metrics_match_naive_references(problem: tuple[np.ndarray, list[int], list[int]]) -> None:
    scores, train, test = problem
    ks = (1, len(train))
    metrics = ranking_metrics(scores, train, test, precision_ks=ks)
    for i, label in enumerate(test):
        relevant = np.array(train) == label
        ranked = naive_ranked_relevance(scores[i], relevant)
        np.testing.assert_allclose(metrics.auc[i], naive_auc(scores[i], relevant), equal_nan=True)
        np.testing.assert_allclose(metrics.average_precision[i], naive_ap(ranked), equal_nan=True)
        expected_rr = 1.0 / (ranked.index(True) + 1) if any(ranked) else 0.0
        assert metrics.reciprocal_rank[i] == pytest.approx(expected_rr)
        for k in ks:
            assert metrics.precision_at[k][i] == pytest.approx(sum(ranked[:k]) / k)
    for values in (
        metrics.auc,
        metrics.average_precision,
        metrics.reciprocal_rank,
        *metrics.precision_at.values(),
    ):
        finite = values[~np.isnan(values)]
        assert ((finite >= 0.0) & (finite <= 1.0)).all()


@settings(max_examples=60, deadline=None)
@given(problems(ties=False))
def test_ap_without_ties_matches_naive_reference(problem: tuple[np.ndarray, list[int], list[int]]) -> None:
    scores, train, test = problem
    metrics = ranking_metrics(scores, train, test, precision_ks=(1,))
    expected = [
        naive_ap(naive_ranked_relevance(row, np.array(train) == label))
        for row, label in zip(scores, test, strict=True)
    ]
    np.testing.assert_allclose(metrics.average_precision, expected, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 2**32 - 1))
def test_auc_ignores_the_order_training_examples_are_stored_in(
    problem: tuple[np.ndarray, list[int], list[int]], seed: int
) -> None:
    """AUC uses average ranks, so even with ties it cannot depend on the storage order."""
    scores, train, test = problem
    permutation = np.random.default_rng(seed).permutation(len(train))
    original = ranking_metrics(scores, train, test, precision_ks=(1,))
    permuted = ranking_metrics(
        scores[:, permutation], [train[j] for j in permutation], test, precision_ks=(1,)
    )
    np.testing.assert_allclose(original.auc, permuted.auc, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_relevant_first_is_perfect_and_reversed_is_worst(
    n_classes: int, per_class: int, n_test: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    train = rng.permutation(np.repeat(np.arange(n_classes), per_class)).tolist()
    test = rng.integers(0, n_classes, n_test).tolist()
    own = np.array(test)[:, None] == np.array(train)[None, :]
    scores = own + 0.5 * rng.random((n_test, len(train)))
    best = ranking_metrics(scores, train, test, precision_ks=(per_class,))
    assert (best.reciprocal_rank == 1.0).all() and (best.average_precision == 1.0).all()
    assert (best.precision_at[per_class] == 1.0).all() and best.hit.all()
    worst = ranking_metrics(-scores, train, test, precision_ks=(1,))
    if n_classes == 1:  # nothing to separate from
        assert np.isnan(best.auc).all() and np.isnan(worst.auc).all()
    else:
        assert (best.auc == 1.0).all() and (worst.auc == 0.0).all()
