"""How far each approximate inverse-Fisher product is from the exact one, block by block.

For every LoRA block, DataInf and LiSSA map a test gradient ``v`` to an approximation of
``(F + lambda I)^-1 v``; ``exact`` computes it exactly (same damping). The relative error
``||T(v) - T_exact(v)|| / ||T_exact(v)||`` over a set of test gradients says whether an approximation is
close enough for its scores to mean what they claim (the study's section 4.1).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from ..attribution.base import GradientBlocks, InnerProductMethod, check_blocks, get_method


def ihvp_relative_errors(
    train: GradientBlocks,
    test: GradientBlocks,
    methods: Mapping[str, InnerProductMethod],
    reference: InnerProductMethod | None = None,
    max_test: int = 20,
) -> dict[str, dict[str, float]]:
    """``{method: {block: relative error}}`` of each method's transformed test gradients against exact.

    Uses the first ``max_test`` test rows (the error is a property of the block's Fisher, not of the
    particular tests); blocks with all-zero training gradients are skipped.
    """
    names, _, n_test = check_blocks(train, test)
    reference = reference or get_method("exact")  # type: ignore[assignment]
    rows = slice(0, min(max_test, n_test))
    errors: dict[str, dict[str, float]] = {name: {} for name in methods}
    for block in names:
        g_train = train[block].double()
        if not bool(g_train.any()):
            continue
        v = test[block][rows].double()
        exact = reference.transform_test(block, g_train, v)  # type: ignore[union-attr]
        denominator = float(exact.norm())
        for name, method in methods.items():
            approx = method.transform_test(block, g_train, v)
            errors[name][block] = float((approx - exact).norm()) / max(denominator, 1e-300)
    return errors


def summarize(errors: Mapping[str, float]) -> dict[str, float]:
    """Median, mean and max of per-block errors."""
    values: Sequence[float] = list(errors.values())
    if not values:
        return {}
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "max": max(values)}


def inner_product_methods(methods: Mapping[str, object]) -> dict[str, InnerProductMethod]:
    """The methods among ``methods`` that approximate an inverse-Fisher product (not exact, not RepSim)."""
    return {
        name: method
        for name, method in methods.items()
        if isinstance(method, InnerProductMethod) and name not in ("exact", "hessian-free")
    }
