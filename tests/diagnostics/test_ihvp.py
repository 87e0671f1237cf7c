from __future__ import annotations

import torch

from llm_attribution.attribution import get_method
from llm_attribution.diagnostics.ihvp import ihvp_relative_errors, inner_product_methods, summarize


def _blocks(n: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(n, d, generator=g, dtype=torch.float64),
        "b": torch.randn(n, d + 3, generator=g, dtype=torch.float64),
    }


def test_errors_are_zero_where_the_approximation_is_exact() -> None:
    # DataInf's per-example Sherman-Morrison average is exact when there is one training example.
    train, test = _blocks(1, 6, 0), _blocks(4, 6, 1)
    errors = ihvp_relative_errors(
        train, test, {"datainf": get_method("datainf"), "exact": get_method("exact")}
    )
    assert max(errors["datainf"].values()) < 1e-10
    assert max(errors["exact"].values()) == 0.0


def test_converged_lissa_is_close_and_short_lissa_is_not() -> None:
    train, test = _blocks(30, 8, 2), _blocks(5, 8, 3)  # n > d: a well-conditioned Fisher
    deep = ihvp_relative_errors(train, test, {"lissa": get_method("lissa", depth=3000)})
    short = ihvp_relative_errors(train, test, {"lissa": get_method("lissa", depth=2)})
    assert summarize(deep["lissa"])["max"] < 1e-4
    assert summarize(short["lissa"])["median"] > 1e-2


def test_inner_product_methods_leaves_out_references() -> None:
    methods = {name: get_method(name) for name in ("hessian-free", "datainf", "exact", "repsim", "lissa")}
    assert sorted(inner_product_methods(methods)) == ["datainf", "lissa"]


def test_directions_exact_is_one_over_lambda_when_damping_dominates() -> None:
    from llm_attribution.diagnostics.ihvp import ihvp_directions

    train, test = _blocks(10, 6, 4), _blocks(3, 6, 5)
    huge = {"exact": get_method("exact", damping_scale=1e8), "datainf": get_method("datainf")}
    cosines = ihvp_directions(train, test, huge, reference=huge["exact"])
    assert min(cosines["exact"]["vs_gradient"].values()) > 1 - 1e-6
    assert min(cosines["exact"]["vs_exact"].values()) > 1 - 1e-12
    small = ihvp_directions(train, test, {"exact": get_method("exact", damping_scale=1e-3)})
    assert max(small["exact"]["vs_gradient"].values()) < 0.99
