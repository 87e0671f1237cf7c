"""Bootstrap intervals, per-class means and seed spread on small, hand-checked inputs and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_attribution.core.errors import ConfigError, DataError
from llm_attribution.evaluation.statistics import bootstrap_ci, per_class, seed_spread


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
