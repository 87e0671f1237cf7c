"""Curvature products and CG against brute force: dense Hessians, explicit Jacobians, direct solves.

The model is the tiny Llama with a rank-1 LoRA on ``v_proj`` (four blocks, 192 parameters), small enough
for dense ``D x D`` matrices built by a different route (``torch.func`` on a flat parameter vector).
"""

from __future__ import annotations

import typing

import pytest
import torch
from torch.func import functional_call, jacfwd
from torch.nn.attention import SDPBackend, sdpa_kernel

from llm_attribution.attribution.base import InnerProductMethod
from llm_attribution.attribution.registry import get_method
from llm_attribution.core.errors import ConfigError, DataError
from llm_attribution.data.templates import IGNORE_INDEX, PromptSettings, collate, encode_examples
from llm_attribution.features.curvature import (
    EmpiricalFisher,
    ModelCurvature,
    ParameterLayout,
    conjugate_gradients,
    gradient_scores,
    mean_diagonal,
    spread_rows,
)
from llm_attribution.features.gradients import (
    GradientSettings,
    collect_features,
    per_example_losses,
)
from llm_attribution.models.lora import attach_lora
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from llm_attribution.models.tuning import lora_modules
from tests.helpers import toy_task

PROMPT = PromptSettings(max_length=32)
N_TRAIN = 6


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings(lora_r=1, lora_targets=("v_proj",), lora_dropout=0.5))
    with torch.no_grad():  # LoRA B starts at zero: give every block a non-trivial gradient and curvature
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.eval()
    examples = toy_task(n_train=N_TRAIN).train
    return model, loaded.tokenizer, examples


def _flat_loss_parts(model, tokenizer, examples):  # type: ignore[no-untyped-def]
    """The LoRA parameters' names in module order, their flat values, and ``logits(flat)``."""
    modules = lora_modules(model)
    full_names = {id(p): n for n, p in model.named_parameters()}
    names = [full_names[id(m.weight)] for m in modules.values()]
    shapes = [m.weight.shape for m in modules.values()]
    flat = torch.cat([m.weight.detach().reshape(-1) for m in modules.values()])
    batch = collate(encode_examples(examples, tokenizer, PROMPT), tokenizer.pad_token_id)
    labels = batch.pop("labels")

    def logits(theta: torch.Tensor) -> torch.Tensor:
        pieces = theta.split([s.numel() for s in shapes])
        weights = {name: w.reshape(s) for name, w, s in zip(names, pieces, shapes, strict=True)}
        return functional_call(model, weights, args=(), kwargs={**batch, "use_cache": False}).logits

    return flat, logits, labels


def _dense_hessian(model, tokenizer, examples) -> torch.Tensor:  # type: ignore[no-untyped-def]
    flat, logits, labels = _flat_loss_parts(model, tokenizer, examples)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return per_example_losses(logits(theta), labels)[0].mean()

    with sdpa_kernel([SDPBackend.MATH]):
        return typing.cast(
            torch.Tensor, torch.autograd.functional.hessian(loss, flat, vectorize=True)
        ).double()


@pytest.fixture(scope="module")
def dense_hessian(setup) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return _dense_hessian(*setup)


def _dense_gauss_newton(model, tokenizer, examples) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``(1/n) sum_i (1/c_i) sum_t J_it^T (diag p - p p^T) J_it`` from the explicit logit Jacobian."""
    flat, logits, labels = _flat_loss_parts(model, tokenizer, examples)
    with sdpa_kernel([SDPBackend.MATH]):
        z = logits(flat).detach().double()
        jacobian = jacfwd(logits)(flat).double()  # [b, T, V, D]
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    mask = (shifted != IGNORE_INDEX).double()
    weight = mask / mask.sum(dim=1, keepdim=True) / len(examples)
    p = torch.softmax(z, dim=-1)[..., None]  # [b, T, V, 1]
    h_jacobian = p * jacobian - p * (p * jacobian).sum(dim=2, keepdim=True)  # (diag p - p p^T) J
    return torch.einsum("bt,btvd,btve->de", weight, jacobian, h_jacobian)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_hessian_products_equal_dense_hessian(setup, dense_hessian) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, examples = setup
    operator = ModelCurvature(model, tokenizer, examples, PROMPT, "hessian", batch_size=4)
    dense = dense_hessian
    assert dense.shape == (operator.layout.size, operator.layout.size) == (192, 192)
    v = torch.randn(3, 192, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = operator(v)
    assert operator.passes == 1
    assert _rel(got, v @ dense) < 1e-4
    eigenvalues = torch.linalg.eigvalsh((dense + dense.T) / 2)
    assert eigenvalues.min() < 0 < eigenvalues.max()  # indefinite: the test is not of a PSD matrix


def test_gauss_newton_products_equal_explicit_jacobians(setup, dense_hessian) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, examples = setup
    operator = ModelCurvature(model, tokenizer, examples, PROMPT, "gauss-newton", batch_size=4)
    dense = _dense_gauss_newton(model, tokenizer, examples)
    v = torch.randn(3, 192, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert _rel(operator(v), v @ dense) < 1e-4
    assert float(torch.linalg.eigvalsh(dense).min()) > -1e-8 * float(dense.norm())  # PSD
    assert _rel(dense, dense_hessian) > 1e-2  # the two differ: the test can tell them apart


def test_products_do_not_depend_on_batch_size(setup) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, examples = setup
    v = torch.randn(2, 192, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for kind in ("hessian", "gauss-newton"):
        one = ModelCurvature(model, tokenizer, examples, PROMPT, kind, batch_size=N_TRAIN)(v)
        split = ModelCurvature(model, tokenizer, examples, PROMPT, kind, batch_size=2)(v)
        assert _rel(split, one) < 1e-5, kind


def test_fisher_products_equal_dense_fisher(setup) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, examples = setup
    features = collect_features(model, tokenizer, examples, PROMPT, GradientSettings(), representations=False)
    layout = ParameterLayout.of_blocks(features.blocks, features.shapes)
    g = layout.join(features.blocks).double()
    dense = g.T @ g / N_TRAIN
    fisher = EmpiricalFisher(features.blocks, layout)
    v = torch.randn(4, layout.size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert _rel(fisher(v), v @ dense) < 1e-12
    assert fisher.mean_diagonal() == pytest.approx(float(dense.diagonal().mean()), rel=1e-12)


def test_subset_of_blocks_is_the_submatrix(setup) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, examples = setup
    full = ModelCurvature(model, tokenizer, examples, PROMPT, "hessian", batch_size=4)
    name = full.layout.names[1]
    part = ModelCurvature(model, tokenizer, examples, PROMPT, "hessian", batch_size=4, names=[name])
    assert part.layout.names == (name,)
    v = torch.randn(2, part.layout.size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    widths = dict(zip(full.layout.names, full.layout.widths, strict=True))
    padded = full.layout.join(
        {n: v if n == name else torch.zeros(2, w, dtype=v.dtype) for n, w in widths.items()}
    )
    assert _rel(part(v), full.layout.split(full(padded))[name]) < 1e-6
    with pytest.raises(DataError):
        ModelCurvature(model, tokenizer, examples, PROMPT, "hessian", names=["nope"])
    with pytest.raises(ConfigError):
        ModelCurvature(model, tokenizer, examples, PROMPT, "fisher")


def test_hutchinson_mean_diagonal() -> None:
    generator = torch.Generator().manual_seed(6)
    a = torch.randn(50, 50, dtype=torch.float64, generator=generator)
    dense = a @ a.T + torch.diag(torch.arange(50, dtype=torch.float64))
    estimate = mean_diagonal(lambda v: v @ dense, 50, probes=400, seed=0)
    truth = float(dense.diagonal().mean())
    assert abs(estimate.mean_diagonal - truth) < 4 * estimate.standard_error
    assert estimate.standard_error < 0.1 * truth
    diagonal = torch.diag(torch.linspace(1, 3, 50, dtype=torch.float64))  # Rademacher: exact on a diagonal
    assert mean_diagonal(lambda v: v @ diagonal, 50, probes=2).mean_diagonal == pytest.approx(2.0)


def _spd_and_rhs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(20, 60, dtype=torch.float64, generator=generator)
    return g.T @ g / 20, torch.randn(5, 60, dtype=torch.float64, generator=generator)


def test_cg_equals_direct_solve_and_reports_its_residual() -> None:
    dense, b = _spd_and_rhs(7)
    b[2] = 0.0  # a zero right-hand side is solved by zero, at once
    damping = 0.05
    result = conjugate_gradients(lambda v: v @ dense, b, damping, max_iterations=200, tolerance=1e-10)
    system = dense + damping * torch.eye(60, dtype=torch.float64)
    expected = torch.linalg.solve(system, b.T).T
    assert _rel(result.solution, expected) < 1e-8
    recomputed = ((result.solution @ system - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).tolist()
    recomputed[2] = 0.0
    assert result.relative_residual == pytest.approx(recomputed, abs=1e-14)
    assert all(r < 1e-9 for r in result.relative_residual)
    assert result.converged == [True] * 5 and not any(result.negative_curvature)
    assert (
        result.iterations[2] == 0 and 0 < max(result.iterations) <= 25
    )  # rank 20 + damping: 21 steps, bar rounding
    assert result.min_curvature[0] >= damping * (1 - 1e-9)


def test_cg_stops_at_max_iterations_with_the_true_residual() -> None:
    dense, b = _spd_and_rhs(8)
    result = conjugate_gradients(lambda v: v @ dense, b, 1e-3, max_iterations=3, tolerance=1e-12)
    system = dense + 1e-3 * torch.eye(60, dtype=torch.float64)
    recomputed = ((result.solution @ system - b).norm(dim=1) / b.norm(dim=1)).tolist()
    assert result.iterations == [3] * 5 and result.converged == [False] * 5
    assert result.relative_residual == pytest.approx(recomputed, rel=1e-10)
    assert min(recomputed) > 1e-3  # far from solved: the residual reported is the real one


def test_cg_reports_negative_curvature() -> None:
    diagonal = torch.tensor([3.0, 2.0, -1.0, 1.0], dtype=torch.float64)
    b = torch.ones(2, 4, dtype=torch.float64)
    b[1, 2] = 0.0  # this right-hand side never sees the negative direction
    result = conjugate_gradients(lambda v: v * diagonal, b, 0.5, max_iterations=50, tolerance=1e-12)
    assert result.negative_curvature == [True, False]
    assert result.converged == [False, True]
    assert result.min_curvature[0] <= 0
    assert result.relative_residual[1] < 1e-10
    with pytest.raises(ConfigError):
        conjugate_gradients(lambda v: v, b, -1.0)


def test_fisher_scores_on_one_block_equal_exact(setup) -> None:  # type: ignore[no-untyped-def]
    """The ``fisher`` reference on a one-block model is ``exact``: same ``1/n``, same damping formula
    (scale x mean diagonal of the Fisher = scale x mean squared training gradient)."""
    model, tokenizer, _ = setup
    task = toy_task(n_train=N_TRAIN, n_test=4)
    train = collect_features(model, tokenizer, task.train, PROMPT, GradientSettings(), representations=False)
    test = collect_features(model, tokenizer, task.test, PROMPT, GradientSettings(), representations=False)
    name = "layers.1.self_attn.v_proj.lora_A"
    train_blocks, test_blocks = {name: train.blocks[name].double()}, {name: test.blocks[name].double()}
    layout = ParameterLayout.of_blocks(train_blocks, train.shapes)
    fisher = EmpiricalFisher(train_blocks, layout)
    scale = 0.3
    result = conjugate_gradients(fisher, layout.join(test_blocks), scale * fisher.mean_diagonal(), 200, 1e-12)
    scores = gradient_scores(result.solution, train_blocks, layout)
    exact = typing.cast(InnerProductMethod, get_method("exact", damping_scale=scale))
    expected = exact.score(train_blocks, test_blocks).float()
    assert torch.allclose(scores, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    other = typing.cast(InnerProductMethod, get_method("exact", damping_scale=2 * scale))
    assert not torch.allclose(scores, other.score(train_blocks, test_blocks).float(), rtol=1e-3)


def test_layout_refuses_projected_gradients() -> None:
    with pytest.raises(DataError, match="unprojected"):
        ParameterLayout.of_blocks({"a": torch.zeros(2, 6)}, {"a": (2, 2)})


def test_spread_rows() -> None:
    assert spread_rows(10, 3) == [0, 4, 9]  # round(4.5) is 4: banker's rounding
    assert spread_rows(4, 8) == [0, 1, 2, 3]
    assert spread_rows(7, 1) == [0]
    assert spread_rows(0, 3) == []


def test_cg_on_the_model_hessian_equals_the_dense_damped_solve(setup, dense_hessian) -> None:  # type: ignore[no-untyped-def]
    """The whole reference on the model: CG over Hessian products, damped past its most negative
    eigenvalue, against ``torch.linalg.solve`` of the dense damped Hessian."""
    model, tokenizer, examples = setup
    operator = ModelCurvature(model, tokenizer, examples, PROMPT, "hessian", batch_size=4)
    symmetric = (dense_hessian + dense_hessian.T) / 2
    eigenvalues = torch.linalg.eigvalsh(symmetric)
    damping = float(-eigenvalues.min() + 0.2 * eigenvalues.max())
    b = torch.randn(2, 192, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    result = conjugate_gradients(operator, b, damping, max_iterations=60, tolerance=1e-6)
    expected = torch.linalg.solve(symmetric + damping * torch.eye(192, dtype=torch.float64), b.T).T
    assert result.converged == [True, True] and not any(result.negative_curvature)
    assert _rel(result.solution, expected) < 1e-4
    small = conjugate_gradients(operator, b, 1e-3, max_iterations=60, tolerance=1e-6)
    assert any(small.negative_curvature)  # indefinite at a small damping: said, not hidden
