"""The Kronecker random projection: equal to projecting full gradients, unbiased, with JL-sized errors."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.attribution.base import REPLAY
from llm_attribution.attribution.registry import available_methods, get_method
from llm_attribution.core.errors import ConfigError
from llm_attribution.data.templates import PromptSettings
from llm_attribution.features.checkpoints import stack_checkpoints, stack_moments
from llm_attribution.features.gradients import GradientSettings, collect_features
from llm_attribution.features.kronecker import KroneckerFactors
from llm_attribution.features.projection import BlockProjection, KroneckerProjector, factor_dims
from llm_attribution.models.lora import attach_lora
from llm_attribution.models.moments import OptimizerMoments
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from llm_attribution.models.tuning import lora_modules
from llm_attribution.scoring.engine import score_features
from tests.helpers import toy_task

FLOAT32_TOL = 1e-5


def project_full(block: BlockProjection, grads: torch.Tensor) -> torch.Tensor:
    """The reference: ``[b, d_out, d_in]`` full per-example gradients -> ``[b, k_out * k_in]``
    (``P_out G P_in^T``), the full gradients formed first (collection projects the factors instead)."""
    projected = grads if block.out is None else torch.einsum("ko,boi->bki", block.out.to(grads), grads)
    if block.inp is not None:
        projected = torch.einsum("bki,ji->bkj", projected, block.inp.to(grads))
    return projected.reshape(grads.shape[0], -1)


PROMPT = PromptSettings(max_length=40)


@pytest.fixture(scope="module")
def lora_model():
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings(lora_targets=("q_proj", "v_proj", "o_proj")))
    with torch.no_grad():  # LoRA B starts at zero: give every block a non-trivial gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    return model, loaded.tokenizer


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_factored_projection_equals_projecting_the_full_gradient(lora_model) -> None:
    model, tokenizer = lora_model
    examples = toy_task(n_train=9).train
    settings = GradientSettings(gradient_batch_size=4, projection_dim=48, projection_seed=3)
    full = collect_features(model, tokenizer, examples, PROMPT, GradientSettings(gradient_batch_size=4))
    projected = collect_features(model, tokenizer, examples, PROMPT, settings)
    projector = KroneckerProjector(48, seed=3)
    shapes = {name: tuple(m.weight.shape) for name, m in lora_modules(model).items()}
    for name, (d_out, d_in) in shapes.items():
        block = projector.block(name, d_out, d_in)
        expected = project_full(block, full.blocks[name].reshape(-1, d_out, d_in))
        assert projected.blocks[name].shape == (9, block.width) and block.width <= 48
        assert _rel_err(projected.blocks[name], expected) < FLOAT32_TOL, name
    # rank-4 LoRA blocks: the rank side is kept whole, only the width-64 side is projected
    assert factor_dims(4, 64, 48) == (4, 12) and factor_dims(64, 4, 48) == (12, 4)
    # representations and losses do not depend on the projection
    assert torch.equal(projected.losses, full.losses)


def test_projection_is_seeded_per_block() -> None:
    a = KroneckerProjector(16, seed=0).block("layers.0.q_proj.lora_A", 8, 64)
    again = KroneckerProjector(16, seed=0).block("layers.0.q_proj.lora_A", 8, 64)
    other_block = KroneckerProjector(16, seed=0).block("layers.1.q_proj.lora_A", 8, 64)
    other_seed = KroneckerProjector(16, seed=1).block("layers.0.q_proj.lora_A", 8, 64)
    assert a.out is not None and a.inp is not None and again.out is not None and again.inp is not None
    assert torch.equal(a.out, again.out) and torch.equal(a.inp, again.inp)
    assert other_block.out is not None and other_seed.out is not None
    assert not torch.equal(a.out, other_block.out) and not torch.equal(a.out, other_seed.out)
    # a block no larger than the target is kept whole: projecting it could only add noise
    small = KroneckerProjector(64, seed=0).block("b", 4, 16)
    assert small.out is None and small.inp is None and small.width == 64


def _low_rank(d_out: int, d_in: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A sum of ``rank`` token outer products g_t x_t^T, like a LoRA block's per-example gradient."""
    return torch.randn(d_out, rank, generator=generator) @ torch.randn(rank, d_in, generator=generator)


def test_projected_inner_products_are_unbiased() -> None:
    generator = torch.Generator().manual_seed(0)
    x = _low_rank(8, 64, 4, generator)
    y = x + 0.5 * _low_rank(8, 64, 4, generator)
    true = float((x * y).sum())
    draws = torch.tensor(
        [
            float(project_full(block, x[None]) @ project_full(block, y[None]).T)
            for block in (KroneckerProjector(16, seed).block("b", 8, 64) for seed in range(4000))
        ],
        dtype=torch.float64,
    )
    standard_error = float(draws.std()) / len(draws) ** 0.5
    # 4 standard errors; the estimate is precise (a few % of the value), so a biased scale would fail
    assert abs(float(draws.mean()) - true) < 4 * standard_error
    assert standard_error < 0.05 * abs(true)


@pytest.mark.parametrize("rank", [1, 8])
def test_norm_distortion_matches_the_kronecker_jl_bound_and_shrinks_with_dim(rank: int) -> None:
    """E[(|Px|^2/|x|^2 - 1)^2] = 2/k_out + 2/k_in + 4/(k_out k_in) for a rank-one x (the worst case), less
    for higher ranks; a side kept whole contributes no term. Estimated over 1500 independent projections."""
    generator = torch.Generator().manual_seed(rank)
    x = _low_rank(8, 64, rank, generator).double()
    errors = []
    for dim in (16, 64, 256):
        ratios = torch.tensor(
            [
                float(project_full(block, x[None]).square().sum() / x.square().sum())
                for block in (KroneckerProjector(dim, seed).block("b", 8, 64) for seed in range(1500))
            ],
            dtype=torch.float64,
        )
        block = KroneckerProjector(dim, 0).block("b", 8, 64)
        k_out, k_in = block.shape
        terms = [2 / k for k, d in ((k_out, 8), (k_in, 64)) if k < d]
        bound = sum(terms) + (4 / (k_out * k_in) if len(terms) == 2 else 0.0)
        mse = float((ratios - 1).square().mean())
        assert mse < 1.2 * bound, (dim, mse, bound)
        if rank == 1:  # the bound is attained: the projection is as random as claimed, not an identity
            assert mse > 0.8 * bound, (dim, mse, bound)
        errors.append(mse)
    assert errors[0] > errors[1] > errors[2]


def test_every_method_runs_on_projected_features(lora_model) -> None:
    model, tokenizer = lora_model
    task = toy_task(n_train=12, n_test=4)
    settings = GradientSettings(gradient_batch_size=6, projection_dim=32)
    factors = KroneckerFactors()  # the token-level factors kfac and ekfac need, of the projected sides
    train = collect_features(model, tokenizer, task.train, PROMPT, settings, kronecker=factors)
    train.kronecker = factors
    test = collect_features(model, tokenizer, task.test, PROMPT, settings)
    assert all(block.shape[1] <= 32 for block in train.blocks.values())
    assert all(o * i == train.blocks[name].shape[1] for name, (o, i) in train.shapes.items())
    # the moments of the unprojected LoRA matrices, as fine-tuning saves them
    widths = {name: module.weight.numel() for name, module in lora_modules(model).items()}
    ones = {name: torch.ones(width) for name, width in widths.items()}
    moments = OptimizerMoments(ones, ones, dict.fromkeys(widths, 3), 0.9, 0.999, 1e-8)
    stacked = [stack_checkpoints({1: features}, {1: 1e-3}) for features in (train, test)]
    for name in available_methods():
        method = get_method(name)
        if method.kind == REPLAY:  # magic replays the run and reads no features, projected or not
            continue
        on = stacked if method.needs_checkpoints else (train, test)
        if method.needs_moments:  # preconditions per coordinate: projected rows are refused, in one line
            for features in on:
                features.moments = moments if not method.needs_checkpoints else stack_moments({1: moments})
            with pytest.raises(ConfigError, match="unprojected gradients"):
                score_features(method, *on)
            continue
        scores = score_features(method, *on)
        assert scores.shape == (4, 12) and torch.isfinite(scores).all(), name
        assert scores.abs().sum() > 0, name


def test_projection_dim_is_validated() -> None:
    with pytest.raises(ConfigError, match="projection-dim"):
        GradientSettings(projection_dim=0)
    assert GradientSettings().fingerprint() == {}
    assert GradientSettings(projection_dim=8, projection_seed=2).fingerprint()["projection"]["dim"] == 8
