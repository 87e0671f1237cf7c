"""The linear datamodeling score (LDS): do a method's scores predict what retraining without data does?

For M random subsets S_1..S_M of the training set, each of EXACTLY the same size, a model is retrained on
each subset and every test example's loss measured. A method predicts the effect of a subset by the sum of
its scores over the subset's examples (higher = supports the test output more, so a higher sum should
mean a LOWER loss); its LDS for one test example is the Spearman correlation over the subsets between
that sum and minus the measured loss.

Equal sizes matter: if subsets differed in size, the size alone would move the loss, and a score that is
the same for every example (which predicts by size alone) would earn a high LDS. With equal sizes a
constant score predicts the same for every subset and its LDS is 0 by construction.

Everything here is matrix algebra on ``[n_test, M]`` arrays: no model, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import ConfigError, DataError
from ..core.seeds import block_seed
from .statistics import Difference, bootstrap_ci, paired_difference


def subset_size(n_train: int, fraction: float) -> int:
    """round(fraction x n): the size of every subset; at least one example in and one out."""
    size = round(fraction * n_train)
    if not 1 <= size < n_train:
        raise ConfigError(
            f"--fraction {fraction:g} of {n_train} training examples gives subsets of {size}; "
            "each subset must keep at least one example and leave out at least one"
        )
    return size


def subset_masks(n_train: int, fraction: float, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """``[len(indices), n_train]`` bool: subset ``i`` holds exactly ``subset_size`` examples.

    Subset ``i`` depends only on ``(seed, i)``, so asking for more subsets later keeps the first ones.
    """
    size = subset_size(n_train, fraction)
    masks = torch.zeros(len(indices), n_train, dtype=torch.bool)
    for row, index in enumerate(indices):
        generator = torch.Generator().manual_seed(block_seed(seed, "lds-subset", index))
        masks[row, torch.randperm(n_train, generator=generator)[:size]] = True
    return masks


def row_ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks along each row of a 2-d tensor, ties given their average rank, by one sort (so a
    constant row has no ordering)."""
    sorted_x, order = torch.sort(x, dim=1, stable=True)
    positions = torch.arange(x.shape[1], dtype=torch.float64).expand_as(x)
    # Average the positions within each run of equal values: first/last index of the run, per element.
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    run_id = new_run.cumsum(dim=1) - 1
    first = torch.zeros_like(positions).scatter_reduce(1, run_id, positions, "amin", include_self=False)
    last = torch.zeros_like(positions).scatter_reduce(1, run_id, positions, "amax", include_self=False)
    averaged = (first.gather(1, run_id) + last.gather(1, run_id)) / 2
    return torch.empty_like(averaged).scatter_(1, order, averaged)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks (1-based) along the last axis, ties sharing their average rank."""
    x = torch.as_tensor(np.asarray(values, dtype=np.float64))
    flat = x.reshape(-1, x.shape[-1])
    return (row_ranks(flat) + 1.0).reshape(x.shape).numpy()


def spearman_rows(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``predicted`` with the same row of ``measured``.

    A row whose prediction is the same for every subset ranks nothing: its correlation is 0 (not NaN), so a
    constant score counts as the no-information method it is. A row whose measurement does not vary is NaN.
    """
    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    if p.shape != m.shape or p.ndim != 2:
        raise DataError(f"predictions {p.shape} and measurements {m.shape} must be equal 2-d shapes")
    rp = average_ranks(p)
    rm = average_ranks(m)
    rp -= rp.mean(axis=1, keepdims=True)
    rm -= rm.mean(axis=1, keepdims=True)
    norm_p = np.sqrt((rp**2).sum(axis=1))
    norm_m = np.sqrt((rm**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rp * rm).sum(axis=1) / (norm_p * norm_m)
    rho[norm_p == 0] = 0.0
    rho[(norm_m == 0) | np.isnan(m).any(axis=1)] = np.nan  # a loss not measured on some subset: undefined
    return rho


def lds_per_test(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> np.ndarray:
    """Per test example: Spearman over subsets of (sum of its scores over the subset) with minus the loss.

    ``scores`` ``[n_test, n_train]``, ``masks`` ``[M, n_train]`` bool, ``losses`` ``[M, n_test]``.
    """
    if scores.shape[1] != masks.shape[1] or losses.shape != (masks.shape[0], scores.shape[0]):
        raise DataError(
            f"scores {tuple(scores.shape)}, subsets {tuple(masks.shape)} and losses {tuple(losses.shape)} "
            "do not match ([n_test, n_train], [M, n_train], [M, n_test])"
        )
    predicted = scores.double() @ masks.double().T  # [n_test, M]
    return spearman_rows(predicted.numpy(), (-losses.double()).T.numpy())


def noise_ceiling(losses: torch.Tensor, other_seed: torch.Tensor) -> np.ndarray:
    """Per test example: Spearman over subsets between the losses of two training seeds (the same subsets).

    How well the retrained loss of one seed predicts that of another: no score can be expected to predict
    the loss of one seed's retraining better than another seed's retraining does.
    """
    return spearman_rows((-other_seed.double()).T.numpy(), (-losses.double()).T.numpy())


def label_oracle_scores(train_labels: Sequence[str], test_labels: Sequence[str]) -> torch.Tensor:
    """1 where a training example has the test example's label, else 0: the summed score of a subset is the
    count of the test's own class in it, so its LDS says how much of the counterfactual the class explains."""
    train = np.asarray([str(label) for label in train_labels])
    test = np.asarray([str(label) for label in test_labels])
    return torch.from_numpy((test[:, None] == train[None, :]).astype(np.float64))


def difference_in_means(masks: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """``[n_test, n_train]``: mean of minus the loss over subsets holding each example, minus its mean over
    subsets without it: the measured effect of an example, a datamodel fitted on these subsets."""
    inside = masks.double()
    outside = 1.0 - inside
    target = (-losses.double()).T  # [n_test, M]
    with_j = target @ inside / inside.sum(dim=0).clamp(min=1.0)
    without_j = target @ outside / outside.sum(dim=0).clamp(min=1.0)
    return with_j - without_j


@dataclass(frozen=True)
class LdsSummary:
    """The mean of per-test LDS values with its 95% bootstrap interval over test examples."""

    mean: float
    low: float
    high: float
    per_test: list[float]

    @classmethod
    def of(cls, per_test: np.ndarray, seed: int = 0) -> LdsSummary:
        kept = per_test[~np.isnan(per_test)]
        mean = float(kept.mean()) if kept.size else float("nan")
        low, high = bootstrap_ci(per_test, seed=seed)
        return cls(mean, low, high, [float(v) for v in per_test])

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "ci95": [self.low, self.high], "per_test": self.per_test}


def paired_lds(per_test: dict[str, Sequence[float | None]]) -> list[tuple[str, str, Difference]]:
    """The method with the highest mean LDS minus each other method, paired on the same test examples
    (``None``/NaN where a test's LDS is undefined is left out of both), with 95% intervals."""
    values = {
        name: np.array([np.nan if v is None else v for v in row], dtype=np.float64)
        for name, row in per_test.items()
    }
    if len(values) < 2:
        return []
    best = max(values, key=lambda name: float(np.nanmean(values[name])))
    return [
        (best, other, paired_difference(values[best][None, :], values[other][None, :]))
        for other in values
        if other != best
    ]
