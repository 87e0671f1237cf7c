"""Every gradient method through the same checks: exact ground truth, invariances, shapes.

One case table (``CASES``) names each method, its options, the naive reference it must equal, and the
problem it is checked on; the shared tests below run every case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from llm_attribution.attribution.base import InnerProductMethod, PartialScores
from llm_attribution.attribution.registry import get_method

Blocks = dict[str, torch.Tensor]

# Shared tolerances (relative Frobenius error).
EXACT_TOL = 1e-5  # closed forms and factorisations vs a naive float64 reference
CONVERGED_TOL = 1e-3  # an iterative method run long enough
FLOAT32_TOL = 1e-4  # float32 inputs vs the float64 reference


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def make_problem(
    n_train: int, n_test: int, dims: dict[str, int], seed: int, dtype: torch.dtype
) -> tuple[Blocks, Blocks]:
    """Random per-block gradients; blocks get different magnitudes so per-block damping matters."""
    gen = torch.Generator().manual_seed(seed)
    train, test = {}, {}
    for i, (name, d) in enumerate(dims.items()):
        magnitude = 10.0 ** (i - 1)
        train[name] = (magnitude * torch.randn(n_train, d, generator=gen, dtype=torch.float64)).to(dtype)
        test[name] = (magnitude * torch.randn(n_test, d, generator=gen, dtype=torch.float64)).to(dtype)
    return train, test


def damping(g: torch.Tensor, scale: float = 0.1) -> float:
    return scale * float(g.double().pow(2).mean())


# --------------------------------------------------------------------- naive references (float64)


def ref_hessian_free(train: Blocks, test: Blocks) -> torch.Tensor:
    return sum((test[b].double()[:, None, :] * train[b].double()[None, :, :]).sum(-1) for b in train)


def _ref_with_inverse(
    train: Blocks, test: Blocks, inverse: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    total = 0
    for b in train:
        g = train[b].double()
        total = total + (test[b].double() @ inverse(g).T) @ g.T
    return total


def ref_datainf(train: Blocks, test: Blocks) -> torch.Tensor:
    """The average of per-example Sherman-Morrison inverses, each built densely."""

    def inverse(g: torch.Tensor) -> torch.Tensor:
        lam, d = damping(g), g.shape[1]
        per_example = [torch.linalg.inv(torch.outer(gi, gi) + lam * torch.eye(d, dtype=g.dtype)) for gi in g]
        return torch.stack(per_example).mean(0)

    return _ref_with_inverse(train, test, inverse)


def ref_exact(train: Blocks, test: Blocks) -> torch.Tensor:
    def inverse(g: torch.Tensor) -> torch.Tensor:
        d = g.shape[1]
        return torch.linalg.inv(g.T @ g / g.shape[0] + damping(g) * torch.eye(d, dtype=g.dtype))

    return _ref_with_inverse(train, test, inverse)


def ref_lissa_study(train: Blocks, test: Blocks, depth: int = 3, scale: float = 1000.0) -> torch.Tensor:
    """The official loop, one test example and one training example at a time."""
    n_train, n_test = next(iter(train.values())).shape[0], next(iter(test.values())).shape[0]
    out = torch.zeros(n_test, n_train, dtype=torch.float64)
    for b in train:
        g, lam = train[b].double(), damping(train[b])
        for j in range(n_test):
            v = test[b][j].double()
            h = v.clone()
            for _ in range(depth):
                step = sum(((gi @ h) * gi - lam * h) / n_train / scale for gi in g)
                h = v + h - step
            out[j] += g @ h
    return out


def ref_lissa(depth: int) -> Callable[[Blocks, Blocks], torch.Tensor]:
    """The full-batch LiSSA recursion stepped ``depth`` times, with the default scale (largest squared
    training row + lambda)."""

    def reference(train: Blocks, test: Blocks) -> torch.Tensor:
        def inverse(g: torch.Tensor) -> torch.Tensor:
            lam, d = damping(g), g.shape[1]
            scale = float(g.pow(2).sum(dim=1).max()) + lam
            fisher = g.T @ g / g.shape[0]
            h = torch.eye(d, dtype=g.dtype)  # the recursion on every basis vector at once
            v = h.clone()
            for _ in range(depth):
                h = v + (1 - lam / scale) * h - fisher @ h / scale
            return h / scale

        return _ref_with_inverse(train, test, inverse)

    return reference


# --------------------------------------------------------------------- the case table

WIDE = {"n_train": 7, "n_test": 5, "dims": {"layers.0.q.lora_A": 12, "layers.0.q.lora_B": 9}}  # n < d
TALL = {"n_train": 30, "n_test": 4, "dims": {"layers.0.q.lora_A": 5, "layers.0.q.lora_B": 6}}  # n >= d


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    reference: Callable[[Blocks, Blocks], torch.Tensor]
    problem: dict[str, Any]
    tol: float = EXACT_TOL
    options: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("hessian-free", "hessian-free", ref_hessian_free, WIDE),
    Case("datainf-wide", "datainf", ref_datainf, WIDE),
    Case("datainf-tall", "datainf", ref_datainf, TALL),
    Case("exact-woodbury", "exact", ref_exact, WIDE, options={"solver": "auto"}),
    Case("exact-dense", "exact", ref_exact, TALL, options={"solver": "auto"}),
    Case("exact-forced-dense", "exact", ref_exact, WIDE, options={"solver": "dense"}),
    Case("exact-forced-woodbury", "exact", ref_exact, TALL, options={"solver": "woodbury"}),
    Case("lissa-converged", "lissa", ref_exact, TALL, CONVERGED_TOL, {"depth": 2000}),
    Case("lissa-stepped", "lissa", ref_lissa(40), WIDE, options={"depth": 40}),
    Case("lissa-closed-wide", "lissa", ref_lissa(40), WIDE, options={"depth": 40, "closed_form": True}),
    Case("lissa-closed-tall", "lissa", ref_lissa(40), TALL, options={"depth": 40, "closed_form": True}),
    # millions of steps, as LoRA blocks need: the recursion's fixed point is exact's inverse product
    Case("lissa-closed-converged", "lissa", ref_exact, WIDE, options={"depth": 10**8, "closed_form": True}),
    Case("lissa-study", "lissa-study", ref_lissa_study, WIDE),
]
IDS = [case.id for case in CASES]


def build(case: Case, **overrides: Any) -> InnerProductMethod:
    method = get_method(case.method, **{**case.options, **overrides})
    assert isinstance(method, InnerProductMethod)
    return method


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_reference(case: Case, dtype: torch.dtype) -> None:
    train, test = make_problem(**case.problem, seed=0, dtype=dtype)
    scores = build(case).score(train, test)
    tol = case.tol if dtype == torch.float64 else max(case.tol, FLOAT32_TOL)
    assert rel_err(scores, case.reference(train, test)) < tol


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shape_and_dtype(case: Case) -> None:
    train, test = make_problem(**case.problem, seed=1, dtype=torch.float32)
    scores = build(case).score(train, test)
    assert scores.shape == (case.problem["n_test"], case.problem["n_train"])
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chunking_does_not_change_scores(case: Case) -> None:
    train, test = make_problem(**case.problem, seed=2, dtype=torch.float64)
    results = [build(case, chunk_size=size).score(train, test) for size in (1, 3, 1000)]
    for other in results[1:]:
        assert rel_err(other, results[0]) < 1e-6


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_scores_add_up_over_blocks(case: Case) -> None:
    train, test = make_problem(**case.problem, seed=3, dtype=torch.float64)
    method = build(case)
    per_block = sum(method.score({b: train[b]}, {b: test[b]}) for b in train)
    assert rel_err(method.score(train, test), per_block) < 1e-6


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_all_zero_block_contributes_nothing(case: Case) -> None:
    train, test = make_problem(**case.problem, seed=4, dtype=torch.float64)
    method = build(case)
    padded_train = {**train, "zeros": torch.zeros(case.problem["n_train"], 4, dtype=torch.float64)}
    padded_test = {**test, "zeros": torch.randn(case.problem["n_test"], 4, dtype=torch.float64)}
    assert torch.equal(method.score(padded_train, padded_test), method.score(train, test))


@pytest.mark.parametrize("name", ["hessian-free", "datainf", "exact", "lissa"])
def test_scoring_resumed_after_any_block_is_bit_identical(name: str, monkeypatch) -> None:
    """score() from the running sum after k blocks redoes only the rest and gives the same bits."""
    rng = torch.Generator().manual_seed(5)
    train = {f"b{i}": torch.randn(12, 7 + i, generator=rng) for i in range(4)}
    test = {k: torch.randn(3, v.shape[1], generator=rng) for k, v in train.items()}
    method = get_method(name)
    kept: list[PartialScores] = []
    assert isinstance(method, InnerProductMethod)
    whole = method.score(
        train, test, after_group=lambda p: kept.append(PartialScores(p.blocks_done, p.sum.clone()))
    )
    assert [p.blocks_done for p in kept] == [1, 2, 3]
    assert torch.equal(whole, method.score(train, test))
    calls: list[str] = []
    original = method.transform_test
    monkeypatch.setattr(
        method, "transform_test", lambda passes, blocks: calls.extend(blocks) or original(passes, blocks)
    )
    for partial in kept:
        calls.clear()
        assert torch.equal(method.score(train, test, partial), whole)
        assert calls == [f"b{i}" for i in range(partial.blocks_done, 4)]


@pytest.mark.parametrize("name", ["hessian-free", "datainf", "exact"])
def test_grouped_bfloat16_scoring_resumes_at_group_boundaries_only(name: str) -> None:
    """With bf16 products, blocks of equal width are scored as one group: checkpoints fall after whole
    groups, resuming from one gives the same bits, and a sum that ends inside a group is not used."""
    rng = torch.Generator().manual_seed(6)
    widths = [7, 9, 7, 9, 7]
    train = {f"b{i}": torch.randn(12, w, generator=rng) for i, w in enumerate(widths)}
    test = {k: torch.randn(3, v.shape[1], generator=rng) for k, v in train.items()}
    method = get_method(name, product_dtype="bfloat16")
    assert isinstance(method, InnerProductMethod)
    widths_of = {name: block.shape[1] for name, block in train.items()}
    assert method.block_groups(widths_of, 12) == [["b0", "b2", "b4"], ["b1", "b3"]]
    kept: list[PartialScores] = []
    whole = method.score(
        train, test, after_group=lambda p: kept.append(PartialScores(p.blocks_done, p.sum.clone()))
    )
    assert [p.blocks_done for p in kept] == [3]
    assert torch.equal(method.score(train, test, kept[0]), whole)
    inside = PartialScores(1, torch.full_like(kept[0].sum, 1e6))  # not a group boundary: ignored
    assert torch.equal(method.score(train, test, inside), whole)
