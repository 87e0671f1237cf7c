from __future__ import annotations

import json
import typing

import numpy as np
import pytest
import torch

from llm_attribution.attribution import get_method
from llm_attribution.attribution.base import GradientBlocks, InnerProductMethod
from llm_attribution.attribution.passes import TrainPasses
from llm_attribution.core.errors import ConfigError
from llm_attribution.diagnostics.ihvp import (
    compare_ihvp,
    compare_transformed,
    damping_sweep,
    inner_product_methods,
    mean_spearman,
    summarize,
)
from tests.helpers import run_cli, tiny_run_args


def ihvp_relative_errors(train, test, methods, reference=None):  # type: ignore[no-untyped-def]
    """``{method: {block: relative error against exact}}`` from :func:`compare_ihvp`."""
    compared = compare_ihvp(train, test, methods, reference)
    return {name: {b: c["relative_error"] for b, c in blocks.items()} for name, blocks in compared.items()}


def ihvp_directions(train, test, methods, reference=None):  # type: ignore[no-untyped-def]
    """``{method: {"vs_exact" | "vs_gradient": {block: mean cosine}}}`` from :func:`compare_ihvp`."""
    compared = compare_ihvp(train, test, methods, reference)
    return {
        name: {key: {b: c[f"cosine_{key}"] for b, c in blocks.items()} for key in ("vs_exact", "vs_gradient")}
        for name, blocks in compared.items()
    }


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
    train, test = _blocks(10, 6, 4), _blocks(3, 6, 5)
    huge = {"exact": get_method("exact", damping_scale=1e8), "datainf": get_method("datainf")}
    cosines = ihvp_directions(train, test, huge, reference=huge["exact"])
    assert min(cosines["exact"]["vs_gradient"].values()) > 1 - 1e-6
    assert min(cosines["exact"]["vs_exact"].values()) > 1 - 1e-12
    small = ihvp_directions(train, test, {"exact": get_method("exact", damping_scale=1e-3)})
    assert max(small["exact"]["vs_gradient"].values()) < 0.99


def _naive_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of average ranks, one element at a time: the textbook definition."""

    def ranks(x: np.ndarray) -> np.ndarray:
        return np.array([(x < v).sum() + ((x == v).sum() - 1) / 2 for v in x], dtype=float)

    values = []
    for row_a, row_b in zip(a, b, strict=True):
        values.append(np.corrcoef(ranks(row_a), ranks(row_b))[0, 1])
    return float(np.mean(values))


def test_mean_spearman_matches_the_textbook_definition_with_ties() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 5, (6, 17), generator=g).double()  # many ties
    b = torch.randn(6, 17, generator=g, dtype=torch.float64)
    assert mean_spearman(a, b) == pytest.approx(_naive_spearman(a.numpy(), b.numpy()), abs=1e-12)
    assert mean_spearman(b, b) == pytest.approx(1.0)
    assert mean_spearman(b, -b) == pytest.approx(-1.0)
    assert mean_spearman(b, b.exp()) == pytest.approx(1.0)  # a monotone map keeps the ranking


def test_damping_sweep_exact_ranks_like_hessian_free_only_under_heavy_damping() -> None:
    # Low-rank Fisher (n < d): with light damping exact re-weights directions; with heavy damping it is
    # I / lambda, whose scores rank exactly like Hessian-free's. One block: with several, each block's own
    # lambda weights it, so the limit is a block-weighted Hessian-free.
    train, test = _blocks(12, 40, 5), _blocks(6, 40, 6)
    train, test = {"a": train["a"]}, {"a": test["a"]}
    light, heavy = damping_sweep(
        train, test, [1e-3, 1e6], methods=("datainf", "lissa"), options={"lissa": {"depth": 50}}
    )
    assert heavy.rank_correlation_vs_hessian_free["exact"] > 0.9999
    assert light.rank_correlation_vs_hessian_free["exact"] < 0.99
    # Heavy damping: every approximation agrees with exact; its iHVP error is small.
    assert max(heavy.relative_error.values()) < 1e-3
    assert min(heavy.rank_correlation_vs_exact.values()) > 0.999
    assert set(light.relative_error) == {"datainf", "lissa"}


def test_damping_sweep_rejects_non_positive_scales_and_other_methods() -> None:
    train, test = _blocks(5, 4, 7), _blocks(2, 4, 8)
    with pytest.raises(ConfigError, match="positive"):
        damping_sweep(train, test, [0.1, 0.0])
    with pytest.raises(ConfigError, match="repsim"):
        damping_sweep(train, test, [0.1], methods=("repsim",))


def test_cli_ihvp_sweep_on_a_tiny_run(tmp_path, capsys) -> None:
    run = tmp_path / "r"
    argv = ["finetune", *tiny_run_args(train=30, test=5, epochs=1), "--out", str(run)]
    assert run_cli(argv, capsys)[0] == 0
    sweep = ["diagnose", "ihvp", "--run", str(run), "--damping-scales", "0.01,100", "--quiet"]
    code, out, err = run_cli([*sweep, "--method-options", "lissa.depth=20"], capsys)
    assert code == 0, err
    record = json.loads((run / "diagnostics" / "ihvp.json").read_text())
    assert [p["damping_scale"] for p in record["points"]] == [0.01, 100.0]
    assert record["method_options"] == {"lissa": {"depth": 20}}
    low, high = record["points"]
    assert set(low["rank_correlation_vs_hessian_free"]) == {"datainf", "lissa", "exact"}
    # Heavier damping brings exact's ranking closer to Hessian-free's.
    assert (
        high["rank_correlation_vs_hessian_free"]["exact"] > low["rank_correlation_vs_hessian_free"]["exact"]
    )
    assert "rho(HF)" in out
    for bad in ("0.1,-1", "abc"):
        code, _, err = run_cli(["diagnose", "ihvp", "--run", str(run), "--damping-scales", bad], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--damping-scales" in err


class _ExactPlusOrthogonal(InnerProductMethod):
    """``exact``'s transform plus a component orthogonal to the span of each block's training gradients:
    the same scores, a different vector."""

    name = "exact-plus-orthogonal"

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        exact = typing.cast(InnerProductMethod, get_method("exact")).transform_test(train, test)
        out = {}
        for name, t in exact.items():
            assert train.held is not None  # compare_ihvp holds each block's rows
            g = train.held[name].double()
            _, singular, vh = torch.linalg.svd(g, full_matrices=False)
            basis = vh[singular > 1e-10 * singular[0]].T  # [d, rank]: the span of the rows
            noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=t.dtype)
            out[name] = t + 3.0 * (noise - (noise @ basis) @ basis.T)
        return out


def _low_rank_blocks(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    train = {
        "wide": torch.randn(10, 16, generator=g, dtype=torch.float64),  # n < d: the n x n Gram route
        "tall": torch.randn(10, 2, generator=g, dtype=torch.float64)  # n > d, rank 2: the d x d route
        @ torch.randn(2, 6, generator=g, dtype=torch.float64),
    }
    test = {"wide": torch.randn(5, 16, generator=g, dtype=torch.float64)}
    test["tall"] = torch.randn(5, 6, generator=g, dtype=torch.float64)
    return train, test


def test_in_span_error_ignores_what_no_score_sees() -> None:
    train, test = _low_rank_blocks(11)
    method = _ExactPlusOrthogonal()
    compared = compare_ihvp(train, test, {"shifted": method, "exact": get_method("exact")})
    for block in ("wide", "tall"):
        row = compared["shifted"][block]
        assert row["relative_error"] > 0.1  # the full-space error sees the orthogonal component
        assert row["cosine_vs_exact"] < 0.99
        assert row["relative_error_in_span"] < 1e-10  # inside the span the vectors agree
        assert row["cosine_vs_exact_in_span"] == pytest.approx(1.0, abs=1e-10)
        assert compared["exact"][block]["relative_error_in_span"] == 0.0
    # and the scores agree: the orthogonal part is invisible to every training gradient
    shifted = method.score(train, test)
    assert torch.allclose(shifted, get_method("exact").score(train, test), rtol=1e-8, atol=1e-10)


def test_in_span_error_sees_a_difference_inside_the_span() -> None:
    train, test = _low_rank_blocks(12)
    exact = typing.cast(InnerProductMethod, get_method("exact"))
    transformed = {"exact": exact.transform_test(TrainPasses.from_blocks(train, 64), test)}
    transformed["scaled"] = {name: 1.5 * t for name, t in transformed["exact"].items()}
    held = TrainPasses.from_blocks(train, 64)
    compared = compare_transformed(transformed, test, "exact", train=held)
    for block in ("wide", "tall"):
        assert compared["scaled"][block]["relative_error_in_span"] == pytest.approx(0.5, rel=1e-9)
        assert compared["scaled"][block]["cosine_vs_exact_in_span"] == pytest.approx(1.0, abs=1e-12)
    # streamed passes (no rows held: the d x d Gram of one pass) give the same numbers
    chunks = [{k: v[:3] for k, v in train.items()}, {k: v[3:] for k, v in train.items()}]
    streamed = compare_transformed(
        transformed, test, "exact", train=TrainPasses(lambda: iter(chunks), 2, None)
    )
    for block in ("wide", "tall"):
        for key in ("relative_error_in_span", "cosine_vs_exact_in_span"):
            assert streamed["scaled"][block][key] == pytest.approx(compared["scaled"][block][key], rel=1e-9)
    assert "relative_error_in_span" not in compare_transformed(transformed, test, "exact")["scaled"]["wide"]
