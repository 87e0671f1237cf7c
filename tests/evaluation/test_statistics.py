"""Bootstrap intervals, per-class means and seed spread on small, hand-checked inputs and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_attribution.core.errors import ConfigError, DataError
from llm_attribution.evaluation.metrics import coverage_caps
from llm_attribution.evaluation.statistics import (
    bootstrap_ci,
    crossed_bootstrap_means,
    interval,
    paired_difference,
    per_class,
    seed_spread,
    wilson_interval,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.integers(0, 2**16))
def test_interval_contains_the_mean(values: list[float], seed: int) -> None:
    low, high = bootstrap_ci(np.array(values), n_boot=300, seed=seed)
    mean = float(np.mean(values))
    tolerance = 1e-9 * (1.0 + abs(mean))
    assert low - tolerance <= mean <= high + tolerance


def test_interval_narrows_as_n_grows() -> None:
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.random(20))
    large = bootstrap_ci(rng.random(2000))
    assert large[1] - large[0] < (small[1] - small[0]) / 4  # width ~ 1/sqrt(n): 10x narrower expected


def test_interval_is_deterministic_for_a_seed() -> None:
    values = np.random.default_rng(2).random(50)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_interval_ignores_nan_and_is_nan_when_empty() -> None:
    values = np.array([0.1, 0.9, 0.4, 0.7])
    with_nan = np.array([np.nan, 0.1, 0.9, np.nan, 0.4, 0.7])
    assert bootstrap_ci(with_nan, seed=3) == bootstrap_ci(values, seed=3)
    for empty in (np.array([]), np.array([np.nan, np.nan])):
        low, high = bootstrap_ci(empty)
        assert math.isnan(low) and math.isnan(high)


def test_constant_values_give_a_point_interval() -> None:
    assert bootstrap_ci(np.full(10, 0.25)) == pytest.approx((0.25, 0.25))


def test_interval_level_orders_widths() -> None:
    values = np.random.default_rng(4).random(100)
    narrow = bootstrap_ci(values, level=0.5)
    wide = bootstrap_ci(values, level=0.99)
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]


@pytest.mark.parametrize(("n_boot", "level"), [(0, 0.95), (100, 0.0), (100, 1.0)])
def test_bad_bootstrap_settings_are_config_errors(n_boot: int, level: float) -> None:
    with pytest.raises(ConfigError):
        bootstrap_ci(np.ones(3), n_boot=n_boot, level=level)


def test_per_class_means_sorted_by_label_and_skip_nan() -> None:
    result = per_class(np.array([1.0, 0.0, 0.5, np.nan, 1.0]), ["b", "a", "b", "c", "a"])
    assert list(result) == ["a", "b", "c"]
    assert result["a"] == 0.5 and result["b"] == 0.75 and math.isnan(result["c"])
    with pytest.raises(DataError, match="2 values but 3"):
        per_class(np.array([1.0, 2.0]), ["a", "b", "c"])


def test_seed_spread() -> None:
    assert seed_spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3.0}
    assert seed_spread([0.4]) == {"mean": 0.4, "std": 0.0, "min": 0.4, "max": 0.4, "n": 1.0}
    empty = seed_spread([])
    assert empty["n"] == 0.0 and math.isnan(empty["mean"]) and math.isnan(empty["std"])


def test_crossed_bootstrap_equals_resampling_seeds_and_tests_one_by_one() -> None:
    matrix = np.random.default_rng(4).random((3, 7))
    matrix[1, 2] = np.nan  # a missing entry is skipped, not counted as zero
    means = crossed_bootstrap_means(matrix, n_boot=50, seed=9)
    rng = np.random.default_rng(9)  # the same draws, in the same order: tests first, then seeds
    tests, seeds = rng.integers(0, 7, size=(50, 7)), rng.integers(0, 3, size=(50, 3))
    brute = [np.nanmean(matrix[np.ix_(seeds[b], tests[b])]) for b in range(50)]
    assert means == pytest.approx(brute, abs=1e-12)


def test_one_seed_is_the_bootstrap_over_tests() -> None:
    values = np.random.default_rng(5).random(30)
    assert interval(values, seed=2) == pytest.approx(bootstrap_ci(values, seed=2), abs=1e-12)
    assert interval(values[None, :], seed=2) == pytest.approx(bootstrap_ci(values, seed=2), abs=1e-12)


def _coverage(
    seeds: int, tests: int, seed_sd: float, test_sd: float, worlds: int = 600
) -> tuple[float, float]:
    """How often the crossed interval, and the old one (tests only, after averaging the seeds), contain
    the true mean 0.5 of a crossed world: value = 0.5 + seed effect + test effect + noise."""
    rng = np.random.default_rng(0)
    crossed = tests_only = 0
    for world in range(worlds):
        values = (
            0.5
            + seed_sd * rng.standard_normal((seeds, 1))
            + test_sd * rng.standard_normal((1, tests))
            + 0.3 * rng.standard_normal((seeds, tests))
        )
        low, high = interval(values, n_boot=400, seed=world)
        crossed += low <= 0.5 <= high
        low, high = bootstrap_ci(values.mean(axis=0), n_boot=400, seed=world)
        tests_only += low <= 0.5 <= high
    return crossed / worlds, tests_only / worlds


def test_intervals_cover_the_true_mean_at_about_their_nominal_rate() -> None:
    # The grid's shape: 3 seeds x 100 tests, seed sd 0.07 (emotion LiSSA's), per-test sd 0.4.
    crossed, tests_only = _coverage(seeds=3, tests=100, seed_sd=0.07, test_sd=0.4)
    assert 0.90 <= crossed <= 0.99
    assert tests_only < crossed - 0.05  # leaving the seeds out of the interval undercovers
    # Where seeds dominate, the tests-only interval is far off; the crossed one, with 10 seeds, is not.
    crossed, tests_only = _coverage(seeds=10, tests=40, seed_sd=0.3, test_sd=0.3)
    assert 0.90 <= crossed <= 0.99 and tests_only < 0.75


def test_paired_differences_cancel_what_methods_share() -> None:
    rng = np.random.default_rng(6)
    shared = 2.0 * rng.standard_normal((3, 40))  # hard tests and bad seeds hit both methods
    a = shared + 0.1 + 0.05 * rng.standard_normal((3, 40))
    b = shared + 0.05 * rng.standard_normal((3, 40))
    found = paired_difference(a, b)
    assert found.low < 0.1 < found.high and found.resolved
    unpaired_a, unpaired_b = interval(a), interval(b)
    assert unpaired_a[1] > unpaired_b[0]  # unpaired, the two intervals overlap: no verdict
    assert found.high - found.low < (unpaired_a[1] - unpaired_a[0]) / 10
    shifted = paired_difference(b + 0.25, b)
    assert (shifted.mean, shifted.low, shifted.high) == pytest.approx((0.25, 0.25, 0.25))
    assert not paired_difference(b, b).resolved
    with pytest.raises(DataError, match="one shape"):
        paired_difference(a, b[:2])


def test_wilson_interval_keeps_a_width_at_the_edges() -> None:
    # Reference values from the closed form (Wilson, 1927), z = 1.959964.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(20, 20) == pytest.approx((0.83887, 1.0), abs=1e-5)
    low, high = wilson_interval(10, 20)
    assert low == pytest.approx(1 - high) and low == pytest.approx(0.29930, abs=1e-5)
    assert wilson_interval(18.5, 20)[0] < 18.5 / 20 < wilson_interval(18.5, 20)[1]  # fractional hits
    with pytest.raises(DataError):
        wilson_interval(21, 20)


def test_coverage_cap_of_an_imbalanced_task() -> None:
    # mixedM-like: 20 harmful among 250, k = 125 -> a harmful test can reach at most 20 / 125.
    train = ["harmful"] * 20 + ["benign"] * 230
    caps = coverage_caps(train, ["harmful", "benign"], k=125)
    assert caps.tolist() == pytest.approx([0.16, 1.0])
