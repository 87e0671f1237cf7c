"""Token-level K-FAC and EK-FAC against exact computations: the exact damped inverse where the Kronecker
assumption holds, a dense S (x) A reference where it does not, refitted eigenvalues by brute force."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.attribution.base import InnerProductMethod
from llm_attribution.attribution.passes import TrainPasses
from llm_attribution.attribution.registry import get_method
from llm_attribution.core.errors import ConfigError
from llm_attribution.features.kronecker import KroneckerFactors, flat_tokens, gradient_tokens
from tests.helpers import several_token_case


def _method(name: str, factors: KroneckerFactors, shapes: dict, **options: object) -> InnerProductMethod:
    method = get_method(name, **options)
    assert isinstance(method, InnerProductMethod)
    method.bind_shapes(shapes).bind_kronecker(factors)
    return method


def _one_token_examples(n: int, o: int, i: int, seed: int):
    """Examples of one token each that share one input ``u``: ``G_j = g_j u^T``, so the Fisher is
    ``S (x) u u^T`` exactly."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(1, i, generator=gen, dtype=torch.float64)
    g = torch.randn(n, o, generator=gen, dtype=torch.float64) * torch.linspace(
        0.5, 2.0, o, dtype=torch.float64
    )
    factors = KroneckerFactors()
    factors.add("b", u.expand(n, i), g)
    factors.count(n)
    gradients = torch.einsum("no,ti->noi", g, u).reshape(n, -1)
    return gradients, factors


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_equals_the_exact_damped_inverse_where_the_kronecker_assumption_holds(name: str) -> None:
    o, i, n = 4, 6, 30
    train, factors = _one_token_examples(n, o, i, seed=0)
    test = torch.randn(5, o * i, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scores = _method(name, factors, {"b": (o, i)}).score({"b": train}, {"b": test})
    exact = get_method("exact").score({"b": train}, {"b": test})  # type: ignore[attr-defined]
    assert float((scores - exact).norm() / exact.norm()) < 1e-6  # scores are float32


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_a_token_without_gradient_leaves_the_kronecker_case_exact(name: str) -> None:
    """Each example's second token has its own input but a zero output gradient (a sequence's last
    token feeds no loss term): ``G_j = g_j u^T`` still, so the Fisher is ``S (x) u u^T`` and K-FAC over the
    gradient-carrying tokens is exact. Averaging ``A`` over every token would mix the second inputs in."""
    o, i, n = 3, 5, 30
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(1, 1, i, generator=gen, dtype=torch.float64)
    inputs = torch.cat([u.expand(n, 1, i), torch.randn(n, 1, i, generator=gen, dtype=torch.float64)], dim=1)
    g = torch.randn(n, 1, o, generator=gen, dtype=torch.float64)
    outputs = torch.cat([g, torch.zeros(n, 1, o, dtype=torch.float64)], dim=1)
    train = torch.einsum("nto,nti->noi", outputs, inputs).reshape(n, -1)
    mask = gradient_tokens(torch.ones(n, 2, dtype=torch.long), outputs)
    assert mask[:, 0].all() and not mask[:, 1].any()
    factors = KroneckerFactors()
    factors.add("b", flat_tokens(inputs, mask), flat_tokens(outputs, mask))
    factors.count(n)
    test = torch.randn(5, o * i, generator=gen, dtype=torch.float64)
    scores = _method(name, factors, {"b": (o, i)}).score({"b": train}, {"b": test})
    exact = get_method("exact").score({"b": train}, {"b": test})  # type: ignore[attr-defined]
    assert float((scores - exact).norm() / exact.norm()) < 1e-6
    every = KroneckerFactors()  # the same factors with the gradient-free tokens counted
    every.add("b", inputs.reshape(-1, i), outputs.reshape(-1, o))
    every.count(n)
    other = _method(name, every, {"b": (o, i)}).score({"b": train}, {"b": test})
    assert float((other - exact).norm() / exact.norm()) > 1e-2


def _dense(train: torch.Tensor, test: torch.Tensor, fisher: torch.Tensor, scale: float) -> torch.Tensor:
    lam = scale * float(train.pow(2).mean())
    return test @ torch.linalg.inv(fisher + lam * torch.eye(fisher.shape[0], dtype=fisher.dtype)) @ train.T


def test_kfac_and_ekfac_equal_dense_references_where_the_assumption_fails() -> None:
    """Several tokens with their own inputs: K-FAC is the damped inverse of S (x) A itself, EK-FAC of the
    Fisher's variances along the eigenbasis of S (x) A (both built here as D x D matrices)."""
    n, o, i = 25, 3, 5
    train, test, factors = several_token_case(2, n=n, o=o, i=i)
    s, a = factors.covariances("b")
    kfac = _method("kfac", factors, {"b": (o, i)}).score({"b": train}, {"b": test})
    torch.testing.assert_close(
        kfac.double(), _dense(train, test, torch.kron(s, a), 0.1), rtol=1e-6, atol=1e-9
    )
    basis = torch.kron(torch.linalg.eigh(s)[1], torch.linalg.eigh(a)[1])  # row-major vec: output index first
    variances = ((train @ basis) ** 2).mean(dim=0)
    fitted = basis @ torch.diag(variances) @ basis.T
    ekfac = _method("ekfac", factors, {"b": (o, i)}).score({"b": train}, {"b": test})
    torch.testing.assert_close(ekfac.double(), _dense(train, test, fitted, 0.1), rtol=1e-6, atol=1e-9)
    fisher = train.T @ train / n
    assert not torch.allclose(torch.kron(s, a), fisher, rtol=0.1)  # the case is not Kronecker


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_streamed_equals_in_memory(name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    n, t, o, i = 40, 2, 2, 3
    u, g = torch.randn(n, t, i, generator=gen), torch.randn(n, t, o, generator=gen)
    train = {"b": torch.einsum("nto,nti->noi", g, u).reshape(n, -1)}
    test = {"b": torch.randn(3, o * i, generator=gen)}
    factors = KroneckerFactors()
    factors.add("b", u.reshape(-1, i), g.reshape(-1, o))
    factors.count(n)
    method = _method(name, factors, {"b": (o, i)}, chunk_size=16)
    streamed = torch.cat(list(method.score_streamed(TrainPasses.from_blocks(train, 16), test)), dim=1)
    torch.testing.assert_close(streamed, method.score(train, test), rtol=1e-5, atol=1e-6)


def test_without_factors_the_error_says_how_to_get_them() -> None:
    method = get_method("kfac")
    assert isinstance(method, InnerProductMethod)
    train = {"b": torch.randn(5, 6)}
    with pytest.raises(ConfigError, match="Kronecker factors"):
        method.bind_shapes({"b": (2, 3)}).score(train, {"b": torch.randn(2, 6)})


def test_factors_of_another_shape_are_refused() -> None:
    factors = KroneckerFactors()
    factors.add("b", torch.randn(4, 2), torch.randn(4, 3))  # inputs 2 wide, outputs 3: shape (3, 2)
    factors.count(4)
    method = _method("ekfac", factors, {"b": (2, 3)})
    with pytest.raises(ConfigError, match="do not fit"):
        method.score({"b": torch.randn(5, 6)}, {"b": torch.randn(2, 6)})
