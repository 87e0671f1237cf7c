"""Every gradient method with its training gradients streamed in chunks equals the in-memory method.

One case table names each method, its options and the streamed form it exercises (dense Fisher or one
pass per LiSSA step, Woodbury or dense exact, the gathering fallback); the shared test runs them all on
a random problem with a partial last chunk and an all-zero block, and counts the passes each one reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from llm_attribution.attribution.base import InnerProductMethod
from llm_attribution.attribution.passes import TrainPasses
from llm_attribution.attribution.registry import get_method
from llm_attribution.core.errors import DataError

STREAMED_TOL = 1e-5  # float32 scores, same algebra in another order
CHUNK = 7  # training rows per streamed chunk: 40 rows = 5 full chunks and a partial one
DIMS = {"a": 24, "b": 10, "zero": 6}


@dataclass(frozen=True)
class Case:
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    passes: int = 0  # passes over the training chunks before the scoring pass (statistics included)
    n_train: int = 40

    @property
    def id(self) -> str:
        return self.method + "".join(f"-{k}={v}" for k, v in self.options.items()) + f"-n{self.n_train}"


CASES = [
    Case("hessian-free", passes=1),
    Case("datainf", passes=2),
    Case("exact", passes=2),  # auto, n >= d: G^T G accumulated over chunks (d x d)
    Case("exact", n_train=12, passes=2),  # auto, n < d on "a": its rows gathered for Woodbury (n x n)
    Case("exact", {"woodbury_max_rows": 8}, n_train=12, passes=2),  # n above the cap: d x d instead
    Case("exact", {"solver": "woodbury"}, passes=2),
    Case("exact", {"solver": "dense"}, n_train=12, passes=2),
    Case("lissa", {"depth": 30}, passes=2),  # blocks no wider than chunk_size: the d x d Fisher, one pass
    Case("lissa", {"depth": 30, "chunk_size": 16}, passes=1 + 1 + 30),  # "a" is wider: one pass per step
    Case("lissa", {"depth": 20, "batch_size": 9, "repeats": 2}, passes=2),  # mini-batches: gathered
    Case("lissa-study", passes=2),
    Case("lissa-study", {"chunk_size": 16}, passes=1 + 1 + 3),
]


def make_problem(n_train: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    train = {
        name: (i + 1.0) * torch.randn(n_train, d, generator=gen) for i, (name, d) in enumerate(DIMS.items())
    }
    test = {name: torch.randn(5, d, generator=gen) for name, d in DIMS.items()}
    train["zero"] = torch.zeros(n_train, DIMS["zero"])  # skipped by every method: contributes nothing
    return train, test


def from_disk(blocks: dict[str, torch.Tensor]) -> TrainPasses:
    """Passes over row chunks as the feature store gives them: not held in memory, so every streamed
    form is the one a store-backed run takes (a dense Fisher instead of a pass per LiSSA step, say)."""
    starts = range(0, next(iter(blocks.values())).shape[0], CHUNK)
    return TrainPasses(
        lambda: ({k: v[s : s + CHUNK] for k, v in blocks.items()} for s in starts), len(starts)
    )


def streamed(method: InnerProductMethod, passes: TrainPasses, test: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(method.score_streamed(passes, test)), dim=1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_streamed_scores_equal_in_memory_scores(case: Case) -> None:
    train, test = make_problem(case.n_train)
    method = get_method(case.method, **case.options)
    assert isinstance(method, InnerProductMethod)
    expected = method.score(train, test)
    passes = from_disk(train)
    got = streamed(method, passes, test)
    assert got.shape == expected.shape == (5, case.n_train)
    assert float((got - expected).norm() / expected.norm()) < STREAMED_TOL
    assert passes.count == case.passes + 1  # + the scoring pass


def test_exact_streamed_is_the_damped_inverse_on_both_systems() -> None:
    """Woodbury (n x n) and dense (d x d) streamed forms agree: the fallback changes memory, not scores."""
    assert get_method("exact").uses_woodbury(12, 24)  # type: ignore[attr-defined]
    assert not get_method("exact", woodbury_max_rows=8).uses_woodbury(12, 24)  # type: ignore[attr-defined]
    train, test = make_problem(12)
    woodbury = streamed(get_method("exact", solver="woodbury"), from_disk(train), test)
    dense = streamed(get_method("exact", solver="dense"), from_disk(train), test)
    assert float((woodbury - dense).norm() / dense.norm()) < STREAMED_TOL


def test_statistics_are_made_once_for_every_method() -> None:
    train, test = make_problem(40)
    passes = from_disk(train)
    for name in ("hessian-free", "datainf", "exact"):
        method = get_method(name)
        assert isinstance(method, InnerProductMethod)
        streamed(method, passes, test)
    assert passes.count == 1 + 1 + 2 + 2  # statistics, then (datainf, exact) one pass each, + 3 scoring


def test_streamed_blocks_are_checked() -> None:
    train, test = make_problem(10)
    method = get_method("hessian-free")
    assert isinstance(method, InnerProductMethod)
    with pytest.raises(DataError, match="different blocks"):
        streamed(method, from_disk(train), {"a": test["a"]})
    narrow = {**test, "a": test["a"][:, :5]}
    with pytest.raises(DataError, match="width"):
        streamed(method, from_disk(train), narrow)
    with pytest.raises(DataError, match="no training examples"):
        empty = {name: block[:0] for name, block in train.items()}
        streamed(method, TrainPasses(lambda: iter([empty])), test)
