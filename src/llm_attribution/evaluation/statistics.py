"""Uncertainty around per-test metrics: bootstrap intervals, paired differences, Wilson intervals,
per-class means and spread over seeds.

The study reports one number per method, but the test set is small and a fine-tune is one draw of its
seed, so a difference between methods can be noise. These helpers take the per-test arrays of
:mod:`.metrics` and :mod:`.ranking` (where a higher score means more supportive and a higher metric means a
better ranking) and say how much a mean could move:

- :func:`bootstrap_ci`: a percentile bootstrap over test examples (one seed);
- :func:`crossed_bootstrap_means` / :func:`interval`: with several seeds, a ``[seeds, tests]`` matrix in
  which every seed saw every test. Seeds and tests are resampled independently (the two-way "pigeonhole"
  bootstrap of Owen, 2007, for crossed random effects), so the interval carries the variance of both;
  it is slightly conservative (the interaction counts in both margins), which is the side to err on.
  With one seed it is exactly :func:`bootstrap_ci`.
- :func:`paired_difference`: method A minus method B on the same seeds and tests, resampled jointly, so
  that what the two share (a hard test, a bad seed) cancels;
- :func:`wilson_interval`: a binomial interval for accuracy that does not collapse to zero width at 0 or 1;
- :func:`per_class` and :func:`seed_spread`: the mean per test label and the spread over seeds.

NaN entries (e.g. an undefined AUC) are dropped before averaging, as
:meth:`.ranking.RankingMetrics.summary` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

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


def _as_matrix(values: np.ndarray | Sequence[float] | Sequence[Sequence[float]]) -> np.ndarray:
    """``[seeds, tests]`` float64 (a vector is one seed), tests with no value in any seed dropped."""
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise DataError(f"expected [seeds, tests] values, got shape {matrix.shape}")
    return matrix[:, ~np.all(np.isnan(matrix), axis=0)]


def _resample_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """``[n_boot, n]``: how often each of ``n`` units is drawn in each of ``n_boot`` resamples."""
    drawn = rng.integers(0, n, size=(n_boot, n))
    offsets = drawn + n * np.arange(n_boot)[:, None]
    return np.bincount(offsets.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def crossed_bootstrap_means(
    values: np.ndarray | Sequence[float] | Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0
) -> np.ndarray:
    """``[n_boot]`` bootstrap means of a ``[seeds, tests]`` matrix, seeds and tests resampled independently.

    A resample's mean is ``w_s^T M w_t / w_s^T P w_t`` with ``w`` the draw counts and ``P`` the mask of
    present (non-NaN) entries: all resamples in two matrix products, no loop. The test draws come first
    from ``np.random.default_rng(seed)``, so one seed gives :func:`bootstrap_ci`'s resamples exactly.
    Empty when no value is present.
    """
    if n_boot < 1:
        raise ConfigError(f"n_boot must be at least 1, got {n_boot}")
    matrix = _as_matrix(values)
    n_seeds, n_tests = matrix.shape
    if n_tests == 0:
        return np.empty(0)
    rng = np.random.default_rng(seed)
    test_counts = _resample_counts(rng, n_tests, n_boot)
    seed_counts = _resample_counts(rng, n_seeds, n_boot) if n_seeds > 1 else np.ones((n_boot, 1))
    present = ~np.isnan(matrix)
    total = np.einsum("bs,st,bt->b", seed_counts, np.where(present, matrix, 0.0), test_counts)
    count = np.einsum("bs,st,bt->b", seed_counts, present.astype(np.float64), test_counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = total / count
    return means[count > 0]  # a resample of only missing entries says nothing


def _percentiles(means: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must lie strictly between 0 and 1, got {level}")
    if means.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def interval(
    values: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the mean of a ``[seeds, tests]`` matrix (or a vector of one seed's tests) by
    :func:`crossed_bootstrap_means`: seed variance and test variance both in it."""
    return _percentiles(crossed_bootstrap_means(values, n_boot, seed), level)


@dataclass(frozen=True)
class Difference:
    """Mean of A minus B over the same seeds and tests, with its paired interval."""

    mean: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes 0: the data say which of the two is higher."""
        return bool(self.low > 0.0 or self.high < 0.0)


def paired_difference(
    a: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
    b: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Difference:
    """A minus B, both ``[seeds, tests]`` on the same seeds and tests: the differences resampled as one
    matrix, so each resample draws the same seeds and tests for both methods."""
    first, second = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if first.shape != second.shape:
        raise DataError(f"paired values must have one shape, got {first.shape} and {second.shape}")
    difference = first - second
    kept = difference[~np.isnan(difference)]
    mean = float(kept.mean()) if kept.size else float("nan")
    low, high = interval(difference, n_boot, level, seed)
    return Difference(mean, low, high)


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``: unlike a bootstrap it keeps a width at 0
    and 1 (20 hits of 20 give [0.84, 1.00], not [1.00, 1.00]). ``successes`` may be fractional (hits
    averaged over seeds); ``(nan, nan)`` for ``n = 0``."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must lie strictly between 0 and 1, got {level}")
    if n <= 0:
        return float("nan"), float("nan")
    if not 0.0 <= successes <= n:
        raise DataError(f"successes must lie in [0, {n}], got {successes}")
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
