"""ASTRA against exact computations: it converges to ``exact``'s damped inverse where EK-FAC alone does
not, in one iteration where EK-FAC is already exact, and says when its iterations ran out."""

from __future__ import annotations

import torch

from llm_attribution.attribution.base import InnerProductMethod
from llm_attribution.attribution.passes import TrainPasses
from llm_attribution.attribution.registry import get_method
from llm_attribution.evaluation.grid import noted_name
from llm_attribution.features.kronecker import KroneckerFactors
from tests.helpers import several_token_case


def _method(
    name: str, factors: KroneckerFactors, shape: tuple[int, int], **options: object
) -> InnerProductMethod:
    method = get_method(name, **options)
    assert isinstance(method, InnerProductMethod)
    method.bind_shapes({"b": shape}).bind_kronecker(factors)
    return method


def _not_kronecker(seed: int, n: int = 25, t: int = 3, o: int = 3, i: int = 5):
    """Several tokens with their own inputs: the Fisher is not a Kronecker product."""
    train, test, factors = several_token_case(seed, n=n, t=t, o=o, i=i)
    return train, test, factors, (o, i)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_converges_to_the_exact_damped_inverse_where_ekfac_does_not() -> None:
    train, test, factors, shape = _not_kronecker(0)
    exact = get_method("exact").score({"b": train}, {"b": test})  # type: ignore[attr-defined]
    ekfac = _method("ekfac", factors, shape).score({"b": train}, {"b": test})
    astra = _method("astra", factors, shape, iterations=50, tolerance=1e-10)
    scores = astra.score({"b": train}, {"b": test})
    assert _rel(ekfac, exact) > 1e-2  # EK-FAC is an approximation here
    assert _rel(scores, exact) < 1e-6
    assert astra.notes()["converged"] and astra.notes()["max_relative_residual"] < 1e-10
    # the residual falls with the iterations: a cap of 2 stops short and says so
    short = _method("astra", factors, shape, iterations=2, tolerance=1e-10)
    few = short.score({"b": train}, {"b": test})
    assert _rel(scores, exact) < _rel(few, exact)
    assert not short.notes()["converged"]
    assert noted_name("astra", short.notes()) == "astra (2 iterations, not converged on 1 of 1 blocks)"


def test_one_iteration_where_ekfac_is_exact() -> None:
    """One token per example with a shared input: EK-FAC's inverse is exact, so the first preconditioned
    step solves the system."""
    gen = torch.Generator().manual_seed(3)
    n, o, i = 30, 4, 6
    u = torch.randn(1, i, generator=gen, dtype=torch.float64)
    g = torch.randn(n, o, generator=gen, dtype=torch.float64)
    factors = KroneckerFactors()
    factors.add("b", u.expand(n, i), g)
    factors.count(n)
    train = torch.einsum("no,ti->noi", g, u).reshape(n, -1)
    test = torch.randn(3, o * i, generator=gen, dtype=torch.float64)
    astra = _method("astra", factors, (o, i), iterations=10, tolerance=1e-8)
    scores = astra.score({"b": train}, {"b": test})
    exact = get_method("exact").score({"b": train}, {"b": test})  # type: ignore[attr-defined]
    assert _rel(scores, exact) < 1e-6
    assert astra.notes()["iterations_used"] == 1


def test_streamed_equals_in_memory() -> None:
    train, test, factors, shape = _not_kronecker(4)
    method = _method("astra", factors, shape, iterations=30, tolerance=1e-9)
    held = method.score({"b": train}, {"b": test})
    passes = TrainPasses(lambda: ({"b": train[s : s + 7]} for s in range(0, 25, 7)), 4)
    _, columns = method.stream(passes, {"b": test})
    streamed = torch.cat(list(columns), dim=1)
    assert _rel(streamed, held) < 1e-6


def test_plain_conjugate_gradients_finish_in_about_n_steps_on_a_low_rank_block() -> None:
    """n < d: F + lambda I has at most n + 1 distinct eigenvalues, so plain CG needs about n + 1 steps;
    the EK-FAC-preconditioned iteration reaches the same answer (its count is what the docstring warns of)."""
    train, test, factors, shape = _not_kronecker(5, n=8, t=2, o=4, i=6)  # d = 24 > n = 8
    exact = get_method("exact").score({"b": train}, {"b": test})  # type: ignore[attr-defined]
    counts = {}
    for preconditioner in ("none", "ekfac"):
        method = _method(
            "astra", factors, shape, preconditioner=preconditioner, tolerance=1e-9, iterations=200
        )
        assert _rel(method.score({"b": train}, {"b": test}), exact) < 1e-6, preconditioner
        counts[preconditioner] = method.notes()["iterations_used"]
    assert counts["none"] <= 8 + 3
    assert counts["ekfac"] > counts["none"]  # here EK-FAC's approximation spreads the spectrum out
