"""The study's accuracy and coverage: a hand-checked example with ties, and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_attribution.core.errors import DataError
from llm_attribution.evaluation.metrics import evaluate, rank_training

TRAIN = ["a", "a", "b", "b", "c", "c"]  # 3 classes -> k = 2


def test_hand_made_example_with_ties() -> None:
    scores = np.array(
        [
            [1, 1, 5, 5, 0, 0],  # label a: top-2 = [2, 3] (b, b)           -> miss, 0/2
            [0, 2, 2, 1, 0, 0],  # label b: tie 1 (a) vs 2 (b), 1 first    -> miss, 1/2
            [0, 0, 0, 0, 0, 0.5],  # label c: top-2 = [5, 0] (c, a)         -> hit, 1/2
            [9, 0, 0, 0, 0, 9],  # label a: tie 0 (a) vs 5 (c), 0 first    -> hit, 1/2
        ],
        dtype=np.float32,
    )
    metrics = evaluate(scores, TRAIN, ["a", "b", "c", "a"])
    assert metrics.k == 2
    assert metrics.per_test_hit.tolist() == [False, False, True, True]
    assert metrics.per_test_coverage.tolist() == [0.0, 0.5, 0.5, 0.5]
    assert metrics.accuracy == 0.5
    assert metrics.coverage == 0.375
    assert rank_training(scores)[1].tolist() == [1, 2, 3, 0, 4, 5]


def test_torch_and_numpy_agree_and_k_is_floored() -> None:
    scores = torch.arange(14, dtype=torch.float32).reshape(2, 7)
    train = [0, 1, 0, 1, 0, 1, 0]  # 7 examples, 2 classes -> k = 3
    from_torch = evaluate(scores, train, [0, 1])
    from_numpy = evaluate(scores.numpy(), train, [0, 1])
    assert from_torch.k == from_numpy.k == 3
    assert from_torch.accuracy == from_numpy.accuracy == 0.5  # top-1 is index 6 (label 0)
    assert from_torch.coverage == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_explicit_k_and_unseen_test_label() -> None:
    metrics = evaluate(np.array([[3.0, 2.0, 1.0]]), ["x", "y", "x"], ["z"], k=3)
    assert metrics.k == 3 and metrics.accuracy == 0.0 and metrics.coverage == 0.0


@pytest.mark.parametrize(
    ("scores", "train", "test", "k", "message"),
    [
        (np.zeros((2, 3)), ["a"] * 3, ["a"], None, "2 x 3"),
        (np.zeros(3), ["a"] * 3, ["a"], None, "2-D"),
        (np.array([[np.nan, 1.0, 2.0]]), ["a"] * 3, ["a"], None, "NaN"),
        (np.zeros((1, 3)), ["a"] * 3, ["a"], 4, "k must be"),
        (np.zeros((1, 3)), ["a"] * 3, ["a"], 0, "k must be"),
    ],
)
def test_bad_inputs_are_data_errors(
    scores: np.ndarray, train: list[str], test: list[str], k: int | None, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        evaluate(scores, train, test, k=k)


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, list[int], list[int]]:
    n_train = draw(st.integers(1, 25))
    n_test = draw(st.integers(1, 8))
    n_classes = draw(st.integers(1, 4))
    train = draw(st.lists(st.integers(0, n_classes - 1), min_size=n_train, max_size=n_train))
    test = draw(st.lists(st.integers(0, n_classes - 1), min_size=n_test, max_size=n_test))
    seed = draw(st.integers(0, 2**32 - 1))
    ties = draw(st.booleans())
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, (n_test, n_train)) if ties else rng.standard_normal((n_test, n_train))
    return scores.astype(np.float64), train, test


@settings(max_examples=60, deadline=None)
@given(problems())
def test_metrics_are_shares(problem: tuple[np.ndarray, list[int], list[int]]) -> None:
    metrics = evaluate(*problem)
    assert 0.0 <= metrics.accuracy <= 1.0 and 0.0 <= metrics.coverage <= 1.0
    assert metrics.accuracy == pytest.approx(metrics.per_test_hit.mean())
    assert metrics.coverage == pytest.approx(metrics.per_test_coverage.mean())
    assert 1 <= metrics.k <= len(problem[1])


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 2**32 - 1))
def test_permuting_training_examples_with_their_labels(
    problem: tuple[np.ndarray, list[int], list[int]], seed: int
) -> None:
    """Without ties, the order in which training examples are stored cannot matter."""
    _, train, test = problem
    rng = np.random.default_rng(seed)
    scores = rng.permuted(
        np.tile(np.arange(len(train), dtype=np.float64), (len(test), 1)), axis=1
    )  # distinct
    permutation = rng.permutation(len(train))
    original = evaluate(scores, train, test)
    permuted = evaluate(scores[:, permutation], [train[i] for i in permutation], test)
    assert np.array_equal(original.per_test_hit, permuted.per_test_hit)
    assert np.array_equal(original.per_test_coverage, permuted.per_test_coverage)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_own_label_first_is_perfect(n_classes: int, per_class: int, n_test: int, seed: int) -> None:
    """Balanced classes and every own-label example scored above every other: accuracy = coverage = 1."""
    rng = np.random.default_rng(seed)
    train = rng.permutation(np.repeat(np.arange(n_classes), per_class)).tolist()
    test = rng.integers(0, n_classes, n_test).tolist()
    own = np.array(test)[:, None] == np.array(train)[None, :]
    scores = own + 0.5 * rng.random((n_test, len(train)))
    metrics = evaluate(scores, train, test)
    assert metrics.k == per_class
    assert metrics.accuracy == 1.0 and metrics.coverage == 1.0


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 4),
    st.integers(0, 6),
    st.lists(st.sampled_from("abc"), max_size=7),
    st.lists(st.sampled_from("abcd"), max_size=5),
    st.sampled_from([0.0, 1.0, np.nan, np.inf, -np.inf]),
    st.none() | st.integers(-1, 8),
)
def test_any_input_gives_metrics_or_a_data_error(
    n_test: int, n_train: int, train: list[str], test: list[str], special: float, k: int | None
) -> None:
    """Shapes that disagree with the labels, NaN or infinite scores, any k: a result, or a DataError."""
    scores = np.arange(n_test * n_train, dtype=np.float64).reshape(n_test, n_train) % 3
    if scores.size:
        scores.flat[0] = special
    try:
        metrics = evaluate(scores, train, test, k=k)
    except DataError:
        return
    assert scores.shape == (len(test), len(train)) and not np.isnan(scores).any()
    assert metrics.per_test_hit.shape == (len(test),)
    assert all(0.0 <= c <= 1.0 for c in metrics.per_test_coverage)
