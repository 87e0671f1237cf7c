"""Deterministic, label-stratified subsampling and train/test splitting.

Attribution quality is judged per class, so a smaller run must keep the class mix of the full data:
each label gets a share of the limit proportional to its frequency (largest-remainder rounding, so the
shares add up exactly), and every label keeps at least one example whenever the limit allows it. The
chosen examples stay in their original order so that a subsample reads like the data it came from, and
each label is drawn with its own seeded generator so that adding a label never reshuffles the others.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence

from ..core.errors import DataError
from .schema import Example


def stratified_quotas(counts: Mapping[str, int], limit: int) -> dict[str, int]:
    """How many examples of each label a subsample of size ``limit`` takes.

    Quotas are proportional to ``counts`` with largest-remainder rounding (ties broken by label name),
    never exceed a label's count, sum to ``min(limit, total)``, and give every label at least one
    example when ``limit >= len(counts)`` (taken from the labels rounded up the most).
    """
    total = sum(counts.values())
    if limit >= total:
        return dict(counts)
    exact = {label: limit * n / total for label, n in counts.items()}
    quotas = {label: math.floor(q) for label, q in exact.items()}
    by_remainder = sorted(counts, key=lambda label: (-(exact[label] - quotas[label]), label))
    for label in by_remainder[: limit - sum(quotas.values())]:
        quotas[label] += 1
    if limit >= len(counts):
        _ensure_one_each(quotas, exact)
    return quotas


def _ensure_one_each(quotas: dict[str, int], exact: Mapping[str, float]) -> None:
    """Move one example to each label rounded down to zero, from the label with the largest surplus."""
    for label in sorted(label for label, q in quotas.items() if q == 0):
        donors = [d for d, q in quotas.items() if q >= 2]
        donor = min(donors, key=lambda d: (-(quotas[d] - exact[d]), d))
        quotas[donor] -= 1
        quotas[label] = 1


def _chosen_indices(examples: Sequence[Example], quotas: Mapping[str, int], seed: int) -> list[int]:
    """Indices of the examples each label's own seeded generator picks, in original order."""
    by_label: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_label.setdefault(example.label, []).append(index)
    chosen: list[int] = []
    for label, indices in by_label.items():
        rng = random.Random(f"{seed}:{label}")
        chosen.extend(rng.sample(indices, quotas[label]))
    return sorted(chosen)


def subsample(examples: Sequence[Example], limit: int | None, seed: int) -> tuple[Example, ...]:
    """At most ``limit`` examples, stratified by label, seeded, in their original order.

    ``limit=None`` or a limit at least the number of examples returns them all, unchanged.
    """
    if limit is None or limit >= len(examples):
        return tuple(examples)
    if limit < 0:
        raise DataError(f"a subsample limit must be >= 0, got {limit}")
    quotas = stratified_quotas(Counter(e.label for e in examples), limit)
    return tuple(examples[i] for i in _chosen_indices(examples, quotas, seed))


def split_train_test(
    examples: Sequence[Example], test_fraction: float, seed: int
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """Split one set of examples into ``(train, test)``, stratified by label, both in original order.

    The test split takes ``round(len * test_fraction)`` examples, clamped so that neither side is
    empty; this is how data that ships as a single split gets a held-out test set.
    """
    if len(examples) < 2:
        raise DataError(f"cannot split {len(examples)} example(s) into train and test: need at least 2")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction!r}")
    n_test = min(len(examples) - 1, max(1, round(len(examples) * test_fraction)))
    quotas = stratified_quotas(Counter(e.label for e in examples), n_test)
    test_indices = set(_chosen_indices(examples, quotas, seed))
    train = tuple(e for i, e in enumerate(examples) if i not in test_indices)
    test = tuple(e for i, e in enumerate(examples) if i in test_indices)
    return train, test
