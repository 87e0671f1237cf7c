"""Uncertainty around per-test metrics: bootstrap intervals, per-class means and spread over seeds.

The study reports one number per method, but the test set is small, so a difference between methods
can be noise. These helpers take the per-test arrays of :mod:`.metrics` and :mod:`.ranking` (where a
higher score means more supportive and a higher metric means a better ranking) and say how much a mean
could move: a percentile bootstrap over test examples, the mean per test label (does one class carry the
result?), and the spread of a metric over training or scoring seeds. NaN entries (e.g. an undefined AUC)
are dropped before averaging, as :meth:`.ranking.RankingMetrics.summary` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.errors import ConfigError, DataError


def _finite_1d(values: np.ndarray | Sequence[float]) -> np.ndarray:
    """The values as a float64 vector with NaNs removed."""
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[~np.isnan(array)]


def bootstrap_ci(
    values: np.ndarray | Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` over test examples, NaNs dropped first.

    Resamples test examples with replacement, ``n_boot`` times in one ``[n_boot, n]`` index matrix from
    ``np.random.default_rng(seed)``, so the interval is deterministic for a seed. ``(nan, nan)`` when no
    value is left.
    """
    if n_boot < 1:
        raise ConfigError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must lie strictly between 0 and 1, got {level}")
    kept = _finite_1d(values)
    if kept.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = kept[rng.integers(0, kept.size, size=(n_boot, kept.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def per_class(values: np.ndarray | Sequence[float], test_labels: Sequence[str]) -> dict[str, float]:
    """Mean of ``values`` per test label, labels sorted; NaNs are skipped (NaN if a label has no value)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if len(test_labels) != array.size:
        raise DataError(f"{array.size} values but {len(test_labels)} test labels")
    names, codes = np.unique(np.asarray([str(label) for label in test_labels]), return_inverse=True)
    present = ~np.isnan(array)
    counts = np.bincount(codes[present], minlength=len(names))
    sums = np.bincount(codes[present], weights=array[present], minlength=len(names))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / counts, np.nan)
    return {str(name): float(mean) for name, mean in zip(names, means, strict=True)}


def seed_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1; 0.0 for one value), min, max and count of one metric
    over seeds. All NaN (count 0) when there is no value."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "min": nan, "max": nan, "n": 0.0}
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": float(array.size),
    }
