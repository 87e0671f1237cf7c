"""Stratified, seeded subsampling and splitting: exact behaviour plus properties over random inputs."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_attribution.core.errors import DataError
from llm_attribution.data.schema import Example
from llm_attribution.data.subsample import split_train_test, stratified_quotas, subsample


def make_examples(labels: list[str]) -> list[Example]:
    return [
        Example(id=f"e{i}", prompt=f"p{i}", response=f"r{i}", label=label) for i, label in enumerate(labels)
    ]


def test_none_or_large_limit_returns_everything_unchanged() -> None:
    examples = make_examples(["a", "b", "a"])
    assert subsample(examples, None, 0) == tuple(examples)
    assert subsample(examples, 3, 0) == tuple(examples)
    assert subsample(examples, 10, 0) == tuple(examples)


def test_same_seed_same_result_other_seed_other_result() -> None:
    examples = make_examples(["a"] * 50 + ["b"] * 50)
    first = subsample(examples, 20, seed=1)
    assert first == subsample(examples, 20, seed=1)
    assert first != subsample(examples, 20, seed=2)


def test_proportions_follow_label_frequencies() -> None:
    examples = make_examples(["a"] * 60 + ["b"] * 30 + ["c"] * 10)
    counts = Counter(e.label for e in subsample(examples, 20, seed=0))
    assert counts == {"a": 12, "b": 6, "c": 2}


def test_original_order_is_kept() -> None:
    examples = make_examples(["a", "b"] * 30)
    chosen = subsample(examples, 15, seed=3)
    positions = [examples.index(e) for e in chosen]
    assert positions == sorted(positions)


def test_largest_remainder_ties_are_broken_by_label_name() -> None:
    # exact quotas 1.5 / 1.5 / 1.0 -> one extra slot, given to the alphabetically first tied label
    assert stratified_quotas({"b": 3, "a": 3, "c": 2}, 4) == {"a": 2, "b": 1, "c": 1}


def test_every_label_keeps_one_example_when_the_limit_allows() -> None:
    examples = make_examples(["big"] * 97 + ["x", "y", "z"])
    counts = Counter(e.label for e in subsample(examples, 4, seed=0))
    assert counts == {"big": 1, "x": 1, "y": 1, "z": 1}


def test_negative_limit_is_an_error() -> None:
    with pytest.raises(DataError, match=">= 0"):
        subsample(make_examples(["a", "b"]), -1, 0)


def test_split_is_stratified_disjoint_and_complete() -> None:
    examples = make_examples(["a"] * 80 + ["b"] * 20)
    train, test = split_train_test(examples, 0.1, seed=0)
    assert Counter(e.label for e in test) == {"a": 8, "b": 2}
    assert len(train) == 90
    assert {e.id for e in train} | {e.id for e in test} == {e.id for e in examples}
    assert not {e.id for e in train} & {e.id for e in test}
    assert split_train_test(examples, 0.1, seed=0) == (train, test)


def test_split_never_leaves_a_side_empty() -> None:
    train, test = split_train_test(make_examples(["a", "b"]), 0.01, seed=0)
    assert len(train) == 1
    assert len(test) == 1
    with pytest.raises(DataError, match="at least 2"):
        split_train_test(make_examples(["a"]), 0.5, seed=0)


label_lists = st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=120)


@settings(max_examples=150, deadline=None)
@given(labels=label_lists, limit=st.integers(0, 130), seed=st.integers(0, 2**32))
def test_subsample_properties(labels: list[str], limit: int, seed: int) -> None:
    examples = make_examples(labels)
    chosen = subsample(examples, limit, seed)
    assert len(chosen) == min(limit, len(examples))
    positions = [int(e.id[1:]) for e in chosen]
    assert positions == sorted(set(positions))  # a subset, in original order, without repeats
    assert all(examples[i] == e for i, e in zip(positions, chosen, strict=True))
    counts, chosen_counts = Counter(labels), Counter(e.label for e in chosen)
    if limit >= len(counts):
        assert set(chosen_counts) == set(counts)  # every label present keeps at least one example
    quota = {label: limit * n / len(labels) for label, n in counts.items()}
    if limit < len(labels) and all(q >= 1 for q in quota.values()):
        # no label needed topping up to one, so each count is its proportional quota rounded
        assert all(abs(chosen_counts[label] - q) < 1 for label, q in quota.items())


@settings(max_examples=150, deadline=None)
@given(counts=st.dictionaries(st.sampled_from("abcdefgh"), st.integers(1, 40), min_size=1), data=st.data())
def test_quota_properties(counts: dict[str, int], data: st.DataObject) -> None:
    limit = data.draw(st.integers(0, sum(counts.values()) + 5))
    quotas = stratified_quotas(counts, limit)
    assert sum(quotas.values()) == min(limit, sum(counts.values()))
    assert all(0 <= quotas[label] <= n for label, n in counts.items())
    if limit >= len(counts):
        assert all(q >= 1 for q in quotas.values())


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(st.sampled_from("abc"), min_size=2, max_size=80), fraction=st.floats(0.05, 0.95))
def test_split_properties(labels: list[str], fraction: float) -> None:
    examples = make_examples(labels)
    train, test = split_train_test(examples, fraction, seed=0)
    assert train
    assert test
    assert sorted(train + test, key=lambda e: int(e.id[1:])) == examples
