"""Blocks of equal width scored as one batched product: the groups partition the blocks within the memory
budget, and a method's batched transform equals its transform block by block."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.attribution.base import BlockGroup, InnerProductMethod, get_method
from llm_attribution.attribution.grouping import stack_rows, width_groups


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
    train = {f"b{i}": (i + 1.0) * torch.randn(40, 24, generator=rng, dtype=torch.float64) for i in range(3)}
    test = {k: torch.randn(5, 24, generator=rng, dtype=torch.float64) for k in train}
    method = get_method(name, chunk_size=16)  # several row chunks of test and train
    assert isinstance(method, InnerProductMethod)
    group = BlockGroup.gather(list(train), train, test, torch.float64, torch.float64, torch.device("cpu"))
    assert group is not None
    batched = method.transform_test_group(group)
    for index, block in enumerate(train):
        one = method.transform_test(block, train[block], test[block])
        torch.testing.assert_close(batched[index], one, rtol=1e-12, atol=1e-12)


def test_a_group_of_all_zero_blocks_is_skipped() -> None:
    train = {"z": torch.zeros(6, 4), "y": torch.zeros(6, 4)}
    test = {"z": torch.randn(2, 4), "y": torch.randn(2, 4)}
    assert (
        BlockGroup.gather(["z", "y"], train, test, torch.float32, torch.bfloat16, torch.device("cpu")) is None
    )
    scores = get_method("datainf", product_dtype="bfloat16").score(train, test)
    assert torch.equal(scores, torch.zeros(2, 6))
