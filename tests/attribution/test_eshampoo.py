"""Eigenvalue-corrected Shampoo (the example-level factors once called ``ekfac-example``) against exact
computations: a dense Kronecker reference, the exact
inverse where the Fisher is Kronecker-diagonal, and its streamed form against the in-memory one."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.attribution.base import InnerProductMethod
from llm_attribution.attribution.passes import TrainPasses
from llm_attribution.attribution.registry import get_method
from llm_attribution.core.errors import ConfigError

SHAPES = {"q.lora_A": (3, 7), "q.lora_B": (5, 3)}


def _ekfac(**options: object) -> InnerProductMethod:
    method = get_method("eshampoo", **options)
    assert isinstance(method, InnerProductMethod)
    return method


def _random(n: int, m: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    train = {k: torch.randn(n, o * i, generator=gen, dtype=torch.float64) for k, (o, i) in SHAPES.items()}
    test = {k: torch.randn(m, o * i, generator=gen, dtype=torch.float64) for k, (o, i) in SHAPES.items()}
    return train, test


def _dense_reference(g: torch.Tensor, v: torch.Tensor, shape: tuple[int, int], scale: float) -> torch.Tensor:
    """``V (F_EK + lambda I)^-1 G^T`` built as D x D matrices: Kronecker eigenbasis of the two factors,
    eigenvalues = mean squared coordinates of the training rows in that basis."""
    o, i = shape
    mats = g.view(-1, o, i)
    left = sum(x @ x.T for x in mats) / len(mats)
    right = sum(x.T @ x for x in mats) / len(mats)
    basis = torch.kron(torch.linalg.eigh(left)[1], torch.linalg.eigh(right)[1])  # row-major vec
    eigenvalues = ((g @ basis) ** 2).mean(dim=0)
    fisher = basis @ torch.diag(eigenvalues) @ basis.T
    lam = scale * float(g.pow(2).mean())
    return v @ torch.linalg.inv(fisher + lam * torch.eye(o * i, dtype=g.dtype)) @ g.T


def test_matches_a_dense_kronecker_reference() -> None:
    train, test = _random(40, 6, seed=0)
    scores = _ekfac(chunk_size=16).bind_shapes(SHAPES).score(train, test)
    expected = sum(_dense_reference(train[k], test[k], SHAPES[k], 0.1) for k in SHAPES)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_equals_the_exact_inverse_when_the_fisher_is_kronecker_diagonal() -> None:
    """Each training gradient is one scaled direction u_j w_k^T of a fixed Kronecker basis, so the Fisher is
    diagonal in it: the fitted eigenvalues are then the Fisher's own and EK-FAC is exact."""
    gen = torch.Generator().manual_seed(1)
    o, i, n = 3, 5, 60
    u = torch.linalg.qr(torch.randn(o, o, generator=gen, dtype=torch.float64))[0]
    w = torch.linalg.qr(torch.randn(i, i, generator=gen, dtype=torch.float64))[0]
    rows = torch.randint(0, o, (n,), generator=gen)
    cols = torch.randint(0, i, (n,), generator=gen)
    # distinct weights per row and column keep both factors' eigenvalues apart (a unique basis)
    values = torch.randn(n, generator=gen, dtype=torch.float64) * (1 + rows) * (1 + 3 * cols)
    g = torch.stack([v * torch.outer(u[:, r], w[:, c]) for v, r, c in zip(values, rows, cols, strict=True)])
    train = {"b": g.reshape(n, -1)}
    test = {"b": torch.randn(4, o * i, generator=gen, dtype=torch.float64)}
    ekfac = _ekfac().bind_shapes({"b": (o, i)}).score(train, test)
    exact = get_method("exact").score(train, test)  # type: ignore[attr-defined]
    assert float((ekfac - exact).norm() / exact.norm()) < 1e-6


def test_a_one_row_shape_is_the_exact_inverse() -> None:
    """With ``o = 1`` the right factor is the Fisher itself: EK-FAC = exact for any gradients."""
    train, test = _random(9, 3, seed=2)  # n < d: the Fisher is singular, damping decides
    ekfac = _ekfac().bind_shapes({k: (1, t.shape[1]) for k, t in train.items()}).score(train, test)
    exact = get_method("exact").score(train, test)  # type: ignore[attr-defined]
    assert float((ekfac - exact).norm() / exact.norm()) < 1e-6


def test_streamed_equals_in_memory() -> None:
    train, test = _random(50, 5, seed=3)
    method = _ekfac().bind_shapes(SHAPES)
    whole = method.score(train, test)
    streamed = torch.cat(list(method.score_streamed(TrainPasses.from_blocks(train, 16), test)), dim=1)
    torch.testing.assert_close(streamed, whole, rtol=1e-6, atol=1e-6 * float(whole.abs().max()))


def test_shapes_are_required_and_checked() -> None:
    train, test = _random(5, 2, seed=4)
    with pytest.raises(ConfigError, match="matrix shape of block"):
        _ekfac().score(train, test)
    with pytest.raises(ConfigError, match="does not hold"):
        _ekfac().bind_shapes({"q.lora_A": (4, 7), "q.lora_B": (5, 3)}).score(train, test)


def test_the_old_name_selects_the_same_method() -> None:
    assert type(get_method("ekfac-example")) is type(get_method("eshampoo"))
