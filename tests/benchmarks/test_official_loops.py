"""The official-loop baselines of ``make bench`` compute what our methods compute: a speed ratio between
them compares one method with itself, written two ways."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from llm_attribution.attribution.registry import get_method

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("official_loops", ROOT / "benchmarks" / "official_loops.py")
assert spec is not None and spec.loader is not None
loops = importlib.util.module_from_spec(spec)
sys.modules["official_loops"] = loops
spec.loader.exec_module(loops)

SHAPES = {"a": (2, 6), "b": (3, 4)}
BUILDERS = {
    "hessian-free": loops.gmatch_products,
    "datainf": loops.datainf_products,
    "lissa-study": loops.lissa_study_products,
}


def _flat(gradients: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([gradients[i][name].reshape(-1) for i in sorted(gradients)]) for name in SHAPES}


def _double(gradients: dict) -> dict:
    return {i: {name: g.double() for name, g in blocks.items()} for i, blocks in gradients.items()}


def _official_scores(products: dict, train: dict) -> torch.Tensor:
    found = loops.pair_loop(products, train)
    return torch.tensor(
        [[-found[i][t] for i in sorted(train)] for t in sorted(products)], dtype=torch.float64
    )


@pytest.mark.parametrize("method", [*BUILDERS, "exact"])
def test_official_loops_equal_our_methods(method: str) -> None:
    train = {
        i: {k: v.double() for k, v in g.items()} for i, g in loops.random_gradients(SHAPES, 7, 0).items()
    }
    test = {i: {k: v.double() for k, v in g.items()} for i, g in loops.random_gradients(SHAPES, 3, 1).items()}
    if method == "exact":
        inverses = loops.exact_inverses(train, list(SHAPES))
        products = {
            t: {name: (inverses[name] @ test[t][name].reshape(-1)).reshape(SHAPES[name]) for name in SHAPES}
            for t in test
        }
    else:
        products = BUILDERS[method](train, test)
    ours = get_method(method).bind_shapes(SHAPES).score(_flat(train), _flat(test))
    assert torch.allclose(ours.double(), _official_scores(products, train), rtol=1e-4, atol=1e-6)
