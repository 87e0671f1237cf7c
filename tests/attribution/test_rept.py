"""RepT's score is the cosine of [hidden state, its loss gradient], written out; it differs from RepSim's
when the gradients are not negligible, and a method without the gradients says so in one line."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.attribution.registry import get_method
from llm_attribution.core.errors import ConfigError
from llm_attribution.features.gradients import Features
from llm_attribution.scoring.engine import score_features


def _features(n: int, seed: int, with_gradients: bool = True) -> Features:
    generator = torch.Generator().manual_seed(seed)
    reps = torch.randn(n, 6, generator=generator)
    grads = torch.randn(n, 6, generator=generator) if with_gradients else None
    return Features([f"e{i}" for i in range(n)], {}, reps, torch.zeros(n), representation_gradients=grads)


def test_rept_is_the_cosine_of_the_joined_signature() -> None:
    train, test = _features(7, 0), _features(3, 1)
    got = score_features(get_method("rept"), train, test).double()
    joined = [
        torch.cat([f.representations, f.representation_gradients], dim=1).double() for f in (train, test)
    ]
    unit = [j / j.norm(dim=1, keepdim=True) for j in joined]
    want = unit[1] @ unit[0].T
    assert torch.allclose(got, want, atol=1e-6)
    repsim = score_features(get_method("repsim"), train, test).double()
    assert float((got - repsim).abs().max()) > 0.05  # the gradient half matters here


def test_rept_without_representation_gradients_is_refused() -> None:
    train, test = _features(4, 0, with_gradients=False), _features(2, 1, with_gradients=False)
    with pytest.raises(ConfigError, match="rept needs representation gradients"):
        score_features(get_method("rept"), train, test)


def test_unit_halves_weigh_the_gradient_like_the_hidden_state() -> None:
    """``halves=unit``: the cosine of [h/|h|, g/|g|], so a gradient 1e-4 the size of the hidden state still
    moves the scores (with ``raw`` it does not)."""
    train, test = _features(7, 0), _features(3, 1)
    for f in (train, test):
        f.representation_gradients = 1e-4 * f.representation_gradients
    raw = score_features(get_method("rept"), train, test).double()
    unit = score_features(get_method("rept", halves="unit"), train, test).double()
    repsim = score_features(get_method("repsim"), train, test).double()
    assert float((raw - repsim).abs().max()) < 1e-6
    halves = [
        torch.cat(
            [
                torch.nn.functional.normalize(p, dim=1)
                for p in (f.representations, f.representation_gradients)
            ],
            dim=1,
        )
        for f in (train, test)
    ]
    want = (halves[1] @ halves[0].T / 2).double()
    assert torch.allclose(unit, want, atol=1e-6)
    assert float((unit - repsim).abs().max()) > 0.05
