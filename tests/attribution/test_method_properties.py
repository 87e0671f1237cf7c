"""Method-specific properties: the study's claims about its methods, LiSSA's knobs, RepSim."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_methods import TALL, WIDE, make_problem, ref_exact, ref_hessian_free, rel_err

from llm_attribution.attribution.methods.lissa import LissaDivergenceWarning
from llm_attribution.attribution.registry import get_method
from llm_attribution.core.errors import DataError


def test_hessian_free_sum_over_blocks_equals_concatenated_block() -> None:
    train, test = make_problem(**WIDE, seed=5, dtype=torch.float64)
    method = get_method("hessian-free")
    concatenated = method.score(
        {"all": torch.cat(list(train.values()), 1)}, {"all": torch.cat(list(test.values()), 1)}
    )
    assert rel_err(method.score(train, test), concatenated) < 1e-6


def test_datainf_is_exact_with_one_training_example() -> None:
    """Averaging per-example inverses is exact when there is only one example."""
    train, test = make_problem(n_train=1, n_test=3, dims={"a": 6, "b": 4}, seed=6, dtype=torch.float64)
    datainf = get_method("datainf").score(train, test)
    assert rel_err(datainf, get_method("exact").score(train, test)) < 1e-5


def test_damping_dominated_methods_rank_like_hessian_free() -> None:
    """With a huge damping, (F + lambda I)^-1 ~ I / lambda: the study's explanation of its failures."""
    train, test = make_problem(**WIDE, seed=7, dtype=torch.float64)
    for name in ("datainf", "exact"):
        scores = get_method(name, damping_scale=1e6).score(train, test)
        lam = {b: 1e6 * float(g.pow(2).mean()) for b, g in train.items()}
        expected = sum(test[b] @ train[b].T / lam[b] for b in train)
        assert rel_err(scores, expected) < 1e-4


def test_lissa_minibatch_is_seeded_and_roughly_converges() -> None:
    train, test = make_problem(**TALL, seed=8, dtype=torch.float64)
    options = {"depth": 600, "batch_size": 10, "repeats": 3}
    first = get_method("lissa", seed=1, **options).score(train, test)
    assert torch.equal(first, get_method("lissa", seed=1, **options).score(train, test))
    assert not torch.equal(first, get_method("lissa", seed=2, **options).score(train, test))
    chunked = get_method("lissa", seed=1, chunk_size=1, **options).score(train, test)
    assert rel_err(chunked, first) < 1e-6
    assert rel_err(first, ref_exact(train, test)) < 0.2


def test_lissa_explicit_scale_converges_in_woodbury_regime() -> None:
    """n < d: F is singular, so only the damping pulls the null-space component in (rate 1 - lambda/s)."""
    train, test = make_problem(**WIDE, seed=9, dtype=torch.float64)
    block = "layers.0.q.lora_A"
    g = train[block]
    top = float(torch.linalg.eigvalsh(g.T @ g / g.shape[0]).max())
    scores = get_method("lissa", scale=1.2 * top, depth=1500).score({block: g}, {block: test[block]})
    assert rel_err(scores, ref_exact({block: g}, {block: test[block]})) < 1e-3


def test_lissa_divergence_warns_with_block_name() -> None:
    train, test = make_problem(**TALL, seed=10, dtype=torch.float64)
    with pytest.warns(LissaDivergenceWarning, match="larger scale") as record:
        get_method("lissa", scale=1e-3, depth=200).score(train, test)
    messages = " ".join(str(w.message) for w in record)
    assert all(block in messages for block in train)


def test_lissa_safe_default_scale_never_diverges() -> None:
    train, test = make_problem(**WIDE, seed=11, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LissaDivergenceWarning)
        scores = get_method("lissa", depth=50, batch_size=2).score(train, test)
    assert torch.isfinite(scores).all()


def test_lissa_study_is_hessian_free_times_depth_plus_one_for_small_fisher() -> None:
    """The official recursion barely moves away from (depth + 1) v when F / 1000 is tiny."""
    train, test = make_problem(**WIDE, seed=12, dtype=torch.float64)
    for depth in (3, 10):
        scores = get_method("lissa-study", depth=depth).score(train, test)
        assert rel_err(scores, (depth + 1) * ref_hessian_free(train, test)) < 0.05
        order = scores.argsort(dim=1, descending=True)
        assert torch.equal(order, ref_hessian_free(train, test).argsort(dim=1, descending=True))


def test_mismatched_blocks_are_data_errors() -> None:
    train, test = make_problem(**WIDE, seed=13, dtype=torch.float32)
    method = get_method("hessian-free")
    with pytest.raises(DataError, match="different blocks"):
        method.score(train, {"other": test["layers.0.q.lora_A"]})
    with pytest.raises(DataError, match="width"):
        method.score({"a": torch.zeros(3, 4)}, {"a": torch.zeros(2, 5)})
    with pytest.raises(DataError, match="rows"):
        method.score(
            {"a": torch.ones(3, 4), "b": torch.ones(2, 4)}, {"a": torch.ones(2, 4), "b": torch.ones(2, 4)}
        )
    with pytest.raises(DataError, match="no gradient blocks"):
        method.score({}, {})


def test_repsim_is_cosine_similarity() -> None:
    gen = torch.Generator().manual_seed(14)
    train, test = torch.randn(9, 6, generator=gen), torch.randn(4, 6, generator=gen)
    train[3] = 0.0
    method = get_method("repsim", chunk_size=3)
    assert method.kind == "representation"
    scores = method.score_representations(train, test)
    expected = torch.nn.functional.cosine_similarity(test[:, None, :], train[None, :, :], dim=-1)
    assert scores.shape == (4, 9) and scores.dtype == torch.float32
    assert torch.allclose(scores, expected, atol=1e-6)
    assert torch.all(scores[:, 3] == 0)
    with pytest.raises(DataError):
        method.score_representations(train, torch.randn(4, 5))
