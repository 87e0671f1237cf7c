"""Blocks of equal width scored as one batched product: the groups partition the blocks within the memory
budget, and a method's batched transform equals its transform block by block."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.attribution.base import InnerProductMethod
from llm_attribution.attribution.grouping import stack_rows, width_groups
from llm_attribution.attribution.passes import TrainPasses
from llm_attribution.attribution.registry import get_method


def test_unbatched_groups_are_single_blocks_in_order() -> None:
    widths = {"a": 4, "b": 8, "c": 4}
    assert width_groups(widths, rows=10, chunk_rows=16, batched=False) == [["a"], ["b"], ["c"]]


def test_batched_groups_partition_blocks_by_width_within_the_budget() -> None:
    widths = {f"w{i}": (8 if i % 3 else 32) for i in range(20)}
    budget = 10 * 8 * 3  # three 8-wide blocks of 10 rows; a 32-wide block alone exceeds it
    groups = width_groups(widths, rows=10, chunk_rows=4, batched=True, budget=budget)
    assert sorted(name for group in groups for name in group) == sorted(widths)
    for group in groups:
        assert len({widths[name] for name in group}) == 1
        assert len(group) == 1 or len(group) * 10 * widths[group[0]] <= budget
    assert max(len(g) for g in groups) == 3
    # within a width, the given order is kept
    eights = [name for group in groups for name in group if widths[name] == 8]
    assert eights == [name for name in widths if widths[name] == 8]


def test_stack_rows_is_a_view_for_one_block_and_a_converted_copy_otherwise() -> None:
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    assert stack_rows([a], torch.float32, a.device).data_ptr() == a.data_ptr()
    both = stack_rows([a, b], torch.bfloat16, a.device)
    assert both.dtype == torch.bfloat16 and both.shape == (2, 5, 3)
    assert torch.equal(both[1], b.to(torch.bfloat16))


@pytest.mark.parametrize("name", ["datainf", "hessian-free", "exact"])
def test_batched_transform_equals_block_by_block(name: str) -> None:
    rng = torch.Generator().manual_seed(0)
    train = {f"b{i}": (i + 1.0) * torch.randn(40, 24, generator=rng) for i in range(3)}
    test = {k: torch.randn(5, 24, generator=rng) for k in train}
    method = get_method(name, chunk_size=16, product_dtype="bfloat16")  # several row chunks of each
    assert isinstance(method, InnerProductMethod)
    assert method.block_groups({k: 24 for k in train}, 40) == [list(train)]  # one batched group
    batched = method.transform_test(TrainPasses.from_blocks(train, 16), test)
    for block in train:
        one = method.transform_test(TrainPasses.from_blocks({block: train[block]}, 16), {block: test[block]})
        torch.testing.assert_close(batched[block], one[block], rtol=1e-6, atol=1e-6)


def test_all_zero_blocks_are_left_out_and_score_zero() -> None:
    train = {"z": torch.zeros(6, 4), "y": torch.zeros(6, 4)}
    test = {"z": torch.randn(2, 4), "y": torch.randn(2, 4)}
    method = get_method("datainf", product_dtype="bfloat16")
    assert isinstance(method, InnerProductMethod)
    assert method.transform_test(TrainPasses.from_blocks(train, 4), test) == {}
    scores = method.score(train, test)
    assert torch.equal(scores, torch.zeros(2, 6))
