"""How far each approximate inverse-Fisher product is from the exact one, block by block.

For every LoRA block, DataInf and LiSSA map a test gradient ``v`` to an approximation of
``(F + lambda I)^-1 v``; ``exact`` computes it exactly (same damping). The relative error
``||T(v) - T_exact(v)|| / ||T_exact(v)||`` over a set of test gradients says whether an approximation is
close enough for its scores to mean what they claim (the study's section 4.1).
"""

from __future__ import annotations

import statistics
import typing
from collections.abc import Mapping, Sequence

import torch

from ..attribution.base import GradientBlocks, InnerProductMethod, check_blocks, get_method

REFERENCE = "__reference__"  # compare_ihvp's key for a reference method that is not among those compared


def compare_ihvp(
    train: GradientBlocks,
    test: GradientBlocks,
    methods: Mapping[str, InnerProductMethod],
    reference: InnerProductMethod | None = None,
    max_test: int = 20,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {block: {"relative_error", "cosine_vs_exact", "cosine_vs_gradient"}}}``.

    Each method transforms each block's test gradients once. Uses the first ``max_test`` test rows (the
    error is a property of the block's Fisher, not of the particular tests); blocks with all-zero
    training gradients are skipped. A ``cosine_vs_gradient`` near 1 for ``exact`` is the study's
    section-4.1 situation: the damped inverse acts like ``I / lambda``, so inverse-Fisher scores rank like
    Hessian-free ones.
    """
    names, _, n_test = check_blocks(train, test)
    reference = reference or typing.cast(InnerProductMethod, get_method("exact"))
    rows = slice(0, min(max_test, n_test))
    transformed: dict[str, dict[str, torch.Tensor]] = {REFERENCE: {}, **{name: {} for name in methods}}
    for block in names:
        g_train = train[block].double()
        if not bool(g_train.any()):
            continue
        v = test[block][rows].double()
        transformed[REFERENCE][block] = exact = reference.transform_test(block, g_train, v)
        for name, method in methods.items():
            transformed[name][block] = (
                exact if method is reference else method.transform_test(block, g_train, v)
            )
    return compare_transformed(transformed, test, REFERENCE, max_test)


def compare_transformed(
    transformed: Mapping[str, Mapping[str, torch.Tensor]],
    test: GradientBlocks,
    reference: str,
    max_test: int = 20,
) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`compare_ihvp` from test gradients already transformed by each method (``{method: {block:
    [m, d]}}``, e.g. by streamed scoring), against ``transformed[reference]``, on the first ``max_test``
    rows. Every method is compared, the reference too (error 0), except the internal ``REFERENCE`` key."""
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in transformed if name != REFERENCE}
    for block, exact_block in transformed[reference].items():
        exact = exact_block[:max_test].double()
        v = test[block][: exact.shape[0]].double()
        denominator = max(float(exact.norm()), 1e-300)
        for name in out:
            approx = transformed[name][block][:max_test].double()
            out[name][block] = {
                "relative_error": float((approx - exact).norm()) / denominator,
                "cosine_vs_exact": _mean_row_cosine(approx, exact),
                "cosine_vs_gradient": _mean_row_cosine(approx, v),
            }
    return out


def ihvp_relative_errors(
    train: GradientBlocks,
    test: GradientBlocks,
    methods: Mapping[str, InnerProductMethod],
    reference: InnerProductMethod | None = None,
    max_test: int = 20,
) -> dict[str, dict[str, float]]:
    """``{method: {block: relative error against exact}}`` (see :func:`compare_ihvp`)."""
    compared = compare_ihvp(train, test, methods, reference, max_test)
    return {name: {b: c["relative_error"] for b, c in blocks.items()} for name, blocks in compared.items()}


def ihvp_directions(
    train: GradientBlocks,
    test: GradientBlocks,
    methods: Mapping[str, InnerProductMethod],
    reference: InnerProductMethod | None = None,
    max_test: int = 20,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per method, cosines ``{"vs_exact": {block: c}, "vs_gradient": {block: c}}`` (see compare_ihvp)."""
    compared = compare_ihvp(train, test, methods, reference, max_test)
    return {
        name: {key: {b: c[f"cosine_{key}"] for b, c in blocks.items()} for key in ("vs_exact", "vs_gradient")}
        for name, blocks in compared.items()
    }


def _mean_row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-300).mean())


def summarize(errors: Mapping[str, float]) -> dict[str, float]:
    """Median, mean and max of per-block errors."""
    values: Sequence[float] = list(errors.values())
    if not values:
        return {}
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "max": max(values)}


def inner_product_methods(
    methods: Mapping[str, object], include_exact: bool = False
) -> dict[str, InnerProductMethod]:
    """The methods among ``methods`` that approximate an inverse-Fisher product (not Hessian-free, not
    RepSim; ``exact`` only when asked for)."""
    left_out = ("hessian-free",) if include_exact else ("exact", "hessian-free")
    return {
        name: method
        for name, method in methods.items()
        if isinstance(method, InnerProductMethod) and name not in left_out
    }
