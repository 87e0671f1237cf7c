"""How far each approximate inverse-Fisher product is from the exact one, block by block.

For every LoRA block, DataInf and LiSSA map a test gradient ``v`` to an approximation of
``(F + lambda I)^-1 v``; ``exact`` computes it exactly (same damping). The relative error
``||T(v) - T_exact(v)|| / ||T_exact(v)||`` over a set of test gradients says whether an approximation is
close enough for its scores to mean what they claim (the study's section 4.1).

A transformed vector is only ever dotted with the block's training gradients, so its component outside
their span changes no score. Beside the full-space numbers, ``relative_error_in_span`` and
``cosine_vs_exact_in_span`` compare the two vectors' projections onto that span (:class:`TrainingSpan`):
the part of an iHVP error that can move a score.
"""

from __future__ import annotations

import statistics
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..attribution.base import GradientBlocks, InnerProductMethod, check_blocks
from ..attribution.passes import TrainPasses
from ..attribution.registry import get_method
from ..core.errors import ConfigError
from ..core.progress import progress
from ..evaluation.lds import row_ranks

REFERENCE = "__reference__"  # compare_ihvp's key for a reference method that is not among those compared


def compare_ihvp(
    train: GradientBlocks,
    test: GradientBlocks,
    methods: Mapping[str, InnerProductMethod],
    reference: InnerProductMethod | None = None,
    max_test: int = 20,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {block: {"relative_error", "cosine_vs_exact", "cosine_vs_gradient",
    "relative_error_in_span", "cosine_vs_exact_in_span"}}}`` (the last two inside the span of the
    block's training gradients).

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
        transformed[REFERENCE][block] = exact = _transform_block(reference, block, g_train, v)
        for name, method in methods.items():
            transformed[name][block] = (
                exact if method is reference else _transform_block(method, block, g_train, v)
            )
    held = TrainPasses.from_blocks({name: train[name] for name in transformed[REFERENCE]}, 1 << 30)
    return compare_transformed(transformed, test, REFERENCE, max_test, held)


def _transform_block(
    method: InnerProductMethod, block: str, train: torch.Tensor, test: torch.Tensor
) -> torch.Tensor:
    """``method``'s transform of one block's test rows, its training rows held in memory."""
    passes = TrainPasses.from_blocks({block: train}, method.settings.chunk_size)
    return method.transform_test(passes, {block: test})[block]


def compare_transformed(
    transformed: Mapping[str, Mapping[str, torch.Tensor]],
    test: GradientBlocks,
    reference: str,
    max_test: int = 20,
    train: TrainPasses | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`compare_ihvp` from test gradients already transformed by each method (``{method: {block:
    [m, d]}}``, e.g. by streamed scoring), against ``transformed[reference]``, on the first ``max_test``
    rows. Every method is compared, the reference too (error 0), except the internal ``REFERENCE`` key.
    With ``train`` (the training gradients), the in-span numbers are added (one pass when streamed)."""
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in transformed if name != REFERENCE}
    spans = training_spans(train, transformed[reference]) if train is not None else {}
    for block, exact_block in transformed[reference].items():
        exact = exact_block[:max_test].double()
        v = test[block][: exact.shape[0]].double()
        denominator = max(float(exact.norm()), 1e-300)
        span = spans.get(block)
        exact_in_span = span.coordinates(exact) if span is not None else None
        for name in out:
            approx = transformed[name][block][:max_test].double()
            out[name][block] = {
                "relative_error": float((approx - exact).norm()) / denominator,
                "cosine_vs_exact": _mean_row_cosine(approx, exact),
                "cosine_vs_gradient": _mean_row_cosine(approx, v),
            }
            if span is not None and exact_in_span is not None:
                approx_in_span = span.coordinates(approx)
                out[name][block]["relative_error_in_span"] = float(
                    (approx_in_span - exact_in_span).norm()
                ) / max(float(exact_in_span.norm()), 1e-300)
                out[name][block]["cosine_vs_exact_in_span"] = _mean_row_cosine(approx_in_span, exact_in_span)
    return out


class TrainingSpan:
    """An orthonormal basis of the span of one block's training gradients ``G`` (``[n, d]``), applied
    as coordinates: ``x -> x Q^T`` (``Q``: ``[r, d]``, orthonormal rows), whose norm is that of the
    projection of ``x`` onto the span.

    Built from whichever Gram matrix is smaller, in float64: ``G G^T = U diag(w) U^T`` (``n <= d``; then
    ``Q = diag(w)^-1/2 U^T G``, applied as ``(x G^T) U diag(w)^-1/2`` without forming ``Q``) or
    ``G^T G = V diag(w) V^T`` (``Q = V^T``). Rank tolerance: singular values ``sqrt(w)`` below
    ``max(n, d) * eps * s_max``, ``eps`` of the gradients' own dtype (numpy's ``matrix_rank`` rule): such
    directions are rounding of the stored gradients, not directions they span; and eigenvalues below the
    Gram's own float64 rounding, ``max(n, d) * eps64 * w_max``.
    """

    def __init__(self, gram: torch.Tensor, rows: torch.Tensor | None, n: int, d: int, eps: float) -> None:
        w, vectors = torch.linalg.eigh(gram)
        top = float(w.max().clamp_min(0.0))
        k = max(n, d)
        # eigh of a Gram is only good to about k * eps64 * w_max, which for float64 gradients is above
        # the squared rank tolerance: below that floor an eigenvalue is the Gram's rounding, not a direction
        floor = max((k * eps) ** 2, k * torch.finfo(torch.float64).eps) * top
        keep = w > floor if top > 0 else torch.zeros_like(w, dtype=torch.bool)
        self.rank = int(keep.sum())
        self.rows = rows  # G, when the basis is expressed through it (n <= d)
        self.vectors = vectors[:, keep]
        self.scale = w[keep].rsqrt()

    def coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """``[m, d] -> [m, rank]``: ``x``'s coordinates in the orthonormal basis of the span."""
        x = x.to(self.vectors.dtype)
        if self.rows is None:
            return x @ self.vectors
        return (x @ self.rows.T) @ self.vectors * self.scale


def training_spans(train: TrainPasses, names: Iterable[str]) -> dict[str, TrainingSpan]:
    """The :class:`TrainingSpan` of each named block: from the rows when held in memory (``n x n`` Gram
    when ``n <= d``), else from the ``d x d`` Gram accumulated in one pass over the training chunks."""
    names = list(names)
    statistics, eps = train.statistics(), torch.finfo(train.dtype).eps
    if train.held is not None:
        spans = {}
        for name in names:
            g = train.held[name].double()
            n, d = g.shape
            spans[name] = (
                TrainingSpan(g @ g.T, g, n, d, eps) if n <= d else TrainingSpan(g.T @ g, None, n, d, eps)
            )
        return spans
    grams = {
        name: torch.zeros(statistics[name].width, statistics[name].width, dtype=torch.float64)
        for name in names
    }
    for chunk in train:
        for name, gram in grams.items():
            g = chunk[name].to(torch.float64)
            gram.addmm_(g.T, g)
    return {
        name: TrainingSpan(gram, None, statistics[name].rows, statistics[name].width, eps)
        for name, gram in grams.items()
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
        if isinstance(method, InnerProductMethod) and method.inverse_fisher and name not in left_out
    }


SWEPT_METHODS = ("datainf", "lissa")


@dataclass(frozen=True)
class DampingPoint:
    """One damping scale of a sweep: per method, the median over blocks of the iHVP error against ``exact``
    (same damping), and the mean over tests of the Spearman correlation of its scores with Hessian-free's
    and with exact's. ``exact`` itself appears in ``rank_correlation_vs_hessian_free``: as the damping
    grows, ``(F + lambda I)^-1 -> I / lambda`` and that correlation goes to 1 (the study's section 4.1) when
    there is one block; with several, each block's own lambda weights it, so the limit is a block-weighted
    Hessian-free and the correlation levels off below 1."""

    damping_scale: float
    relative_error: dict[str, float]
    cosine_vs_exact: dict[str, float]
    rank_correlation_vs_hessian_free: dict[str, float]
    rank_correlation_vs_exact: dict[str, float]
    relative_error_in_span: dict[str, float]  # medians over blocks, inside the training-gradient span
    cosine_vs_exact_in_span: dict[str, float]
    # per method (exact included): what a judge said of its scores at this damping (accuracy, coverage,
    # LDS where the run has retrained subsets); empty without a judge
    quality: dict[str, dict[str, float]] = field(default_factory=dict)


def damping_sweep(
    train: GradientBlocks,
    test: GradientBlocks,
    damping_scales: Sequence[float],
    methods: Sequence[str] = SWEPT_METHODS,
    options: Mapping[str, Mapping[str, object]] | None = None,
    max_test: int = 20,
    judge: Callable[[torch.Tensor], dict[str, float]] | None = None,
) -> list[DampingPoint]:
    """The iHVP error and the rank agreement of ``methods`` at each damping scale (``options``: further
    per-method settings, e.g. LiSSA's depth; the damping scale is the sweep's). ``judge`` maps a score
    matrix to named quality numbers (the workflow's accuracy, coverage and LDS), recorded per method and
    scale, so the sweep says what the damping does to the answers, not only to the iHVP error."""
    if not damping_scales or any(not scale > 0 for scale in damping_scales):
        raise ConfigError(f"damping scales must be positive numbers, got {list(damping_scales)}")
    unknown = sorted(set(methods) - {"datainf", "lissa", "lissa-study"})
    if unknown:
        raise ConfigError(
            f"the damping sweep compares datainf and lissa with exact, not {', '.join(unknown)}"
        )
    options = options or {}
    hessian_free = typing.cast(InnerProductMethod, get_method("hessian-free")).score(train, test)
    points = []
    for scale in progress(damping_scales, desc="damping sweep"):
        exact = typing.cast(InnerProductMethod, get_method("exact", damping_scale=scale))
        built = {
            name: typing.cast(
                InnerProductMethod, get_method(name, **{**options.get(name, {}), "damping_scale": scale})
            )
            for name in methods
        }
        compared = compare_ihvp(train, test, built, exact, max_test)
        exact_scores = exact.score(train, test)
        scores = {name: method.score(train, test) for name, method in built.items()}
        points.append(
            DampingPoint(
                damping_scale=float(scale),
                relative_error={
                    n: statistics.median(c["relative_error"] for c in compared[n].values()) for n in methods
                },
                cosine_vs_exact={
                    n: statistics.median(c["cosine_vs_exact"] for c in compared[n].values()) for n in methods
                },
                rank_correlation_vs_hessian_free={
                    n: mean_spearman(s, hessian_free) for n, s in {**scores, "exact": exact_scores}.items()
                },
                rank_correlation_vs_exact={n: mean_spearman(s, exact_scores) for n, s in scores.items()},
                relative_error_in_span={
                    n: statistics.median(c["relative_error_in_span"] for c in compared[n].values())
                    for n in methods
                },
                cosine_vs_exact_in_span={
                    n: statistics.median(c["cosine_vs_exact_in_span"] for c in compared[n].values())
                    for n in methods
                },
                quality=(
                    {n: judge(s) for n, s in {"exact": exact_scores, **scores}.items()} if judge else {}
                ),
            )
        )
    return points


def mean_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows (test examples) of the Spearman rank correlation of two score matrices' rows."""
    if a.shape != b.shape:
        raise ValueError(f"score matrices differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    ra, rb = row_ranks(a.double()), row_ranks(b.double())
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    denominator = (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-300)
    return float(((ra * rb).sum(dim=1) / denominator).mean())
