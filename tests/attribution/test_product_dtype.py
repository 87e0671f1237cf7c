"""``product_dtype=bfloat16``: the products with training gradients in bf16 (summed in float32) give scores
within bf16 rounding of the float32 ones, in memory and streamed, and rank training examples the same way
up to near-ties."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.attribution.base import InnerProductMethod
from llm_attribution.attribution.passes import TrainPasses
from llm_attribution.attribution.registry import get_method
from llm_attribution.core.errors import ConfigError

BF16_TOL = 1e-2  # relative Frobenius error: bf16 keeps 8 bits of mantissa (unit roundoff 2^-9)
RANK_TOL = 0.99  # mean Spearman correlation of each test row's ranking with the float32 one
METHODS = ("hessian-free", "datainf", "exact", "lissa-study")


def _problem() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    dims = {"a": 256, "b": 64}
    train = {k: (i + 1.0) * torch.randn(300, d, generator=gen) for i, (k, d) in enumerate(dims.items())}
    test = {k: torch.randn(8, d, generator=gen) for k, d in dims.items()}
    return train, test


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=1).argsort(dim=1).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    return float(((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean())


@pytest.mark.parametrize("name", METHODS)
def test_bfloat16_products_stay_within_rounding_of_float32(name: str) -> None:
    train, test = _problem()
    full = get_method(name).score(train, test)
    method = get_method(name, product_dtype="bfloat16")
    assert isinstance(method, InnerProductMethod)
    for fast in (
        method.score(train, test),
        torch.cat(list(method.score_streamed(TrainPasses.from_blocks(train, 64), test)), 1),
    ):
        assert fast.dtype == torch.float32 and fast.shape == full.shape
        error = float((fast - full).norm() / full.norm())
        assert 0 < error < BF16_TOL, error  # 0 would mean the option did nothing
        assert spearman(fast, full) > RANK_TOL


def test_repsim_cosines_in_bfloat16() -> None:
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(200, 96, generator=gen), torch.randn(6, 96, generator=gen)
    full = get_method("repsim").score_representations(train, test)  # type: ignore[attr-defined]
    fast = get_method("repsim", product_dtype="bfloat16").score_representations(train, test)  # type: ignore[attr-defined]
    assert 0 < float((fast - full).norm() / full.norm()) < BF16_TOL
    assert spearman(fast, full) > RANK_TOL


def test_an_unknown_product_dtype_is_a_user_error() -> None:
    with pytest.raises(ConfigError, match="product_dtype"):
        get_method("datainf", product_dtype="float16")
