"""Gradient cosine against the definition: the cosine of the concatenated gradient vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_attribution.attribution.base import InnerProductMethod
from llm_attribution.attribution.passes import TrainPasses
from llm_attribution.attribution.registry import get_method


def _blocks(n: int, m: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    widths = {"a": 7, "b": 7, "c": 3}  # two of equal width: batched together in bf16, scored apart in fp32
    # rows of very different sizes: the cosine must not follow them, as a dot product would
    scale = torch.logspace(-2, 2, n, dtype=torch.float64)[:, None]
    train = {k: torch.randn(n, w, generator=gen, dtype=torch.float64) * scale for k, w in widths.items()}
    test = {k: torch.randn(m, w, generator=gen, dtype=torch.float64) for k, w in widths.items()}
    return train, test


def _definition(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor]) -> torch.Tensor:
    whole_train = F.normalize(torch.cat(list(train.values()), dim=1), dim=1)
    whole_test = F.normalize(torch.cat(list(test.values()), dim=1), dim=1)
    return whole_test @ whole_train.T


def _method(**options: object) -> InnerProductMethod:
    method = get_method("grad-cosine", **options)
    assert isinstance(method, InnerProductMethod)
    return method


def test_equals_the_cosine_of_the_whole_gradients() -> None:
    train, test = _blocks(30, 4, seed=0)
    expected = _definition(train, test)
    got = _method(chunk_size=8).score(train, test)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    assert got.abs().max() <= 1.0 + 1e-6
    dot = get_method("hessian-free").score(train, test)  # type: ignore[attr-defined]
    assert int(dot.argmax(dim=1).ne(got.argmax(dim=1)).sum()) > 0  # the scale changed the ranking


def test_streamed_equals_in_memory_and_the_definition() -> None:
    train, test = _blocks(41, 3, seed=1)
    method = _method(chunk_size=10)
    streamed = torch.cat(list(method.score_streamed(TrainPasses.from_blocks(train, 10), test)), dim=1)
    torch.testing.assert_close(streamed.double(), _definition(train, test), rtol=1e-6, atol=1e-7)
    unheld = TrainPasses(lambda: ({k: v[s : s + 10] for k, v in train.items()} for s in range(0, 41, 10)))
    streamed = torch.cat(list(method.score_streamed(unheld, test)), dim=1)  # norms from a real pass
    torch.testing.assert_close(streamed.double(), _definition(train, test), rtol=1e-6, atol=1e-7)


def test_a_zero_gradient_scores_zero() -> None:
    train, test = _blocks(6, 2, seed=2)
    for block in train.values():
        block[3] = 0.0
    got = _method().score(train, test)
    assert torch.isfinite(got).all() and bool((got[:, 3] == 0).all())
