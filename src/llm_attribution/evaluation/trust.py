"""Should I trust this ranking? A verdict (high / medium / low) for one method's attribution of one test
output, built from signals the tool measures anyway and calibrated against retraining.

Signals, per method and test example, from the score rows alone (HIGHER score = more supportive):

- ``agreement``: the share of the method's top-k training examples that each other method also puts in
  its top-k, averaged over the other methods. Methods that approximate different things and still agree
  point at examples that stand out; a ranking no other method shares rests on that method's
  approximation alone.
- ``margin``: how far the top-k stand above the rest, ``(mean of the top-k - mean of all) / std of all``
  (unitless, so methods of different scales compare). A flat row means the top of the ranking is a
  near-tie that any approximation error can reorder.

A :class:`TrustModel` maps the signals to a predicted per-test LDS (a linear fit on runs with measured
LDS, :func:`fit_trust_model`) and cuts it at two thresholds (the fitting data's terciles) into the three
verdicts. The shipped calibration (``trust_calibration.json``, made by ``scripts/trust_calibration.py``)
was fitted on the embedded model's ground-truth runs; ``docs/results/trust-calibration.md`` shows, task by
task and fitted without that task, the measured LDS of each verdict. Where a run has a measured LDS, it is
reported beside the verdict: a measurement beats a prediction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch

from ..core.errors import DataError
from .metrics import rank_training

VERDICTS = ("low", "medium", "high")
TRUST_K = 10  # the top-k the signals look at (fewer on a small training set: n_train // 10, at least 1)
CALIBRATION_FILE = "trust_calibration.json"


def trust_k(n_train: int) -> int:
    """The top-k of the signals: :data:`TRUST_K`, or a tenth of a smaller training set."""
    return max(1, min(TRUST_K, n_train // 10))


def _matrix(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    array = scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor) else scores
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise DataError(f"scores must be [n_test, n_train], got shape {array.shape}")
    return array


def _top_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """``[n_test, n_train]`` bool: the top-k of each row (ties by lower training index, as the metrics)."""
    top = rank_training(scores)[:, :k]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    return mask


def margins(scores: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """``[n_test]``: (mean of the top-k - mean of the row) / the row's standard deviation; 0 for a
    constant row (nothing stands out)."""
    array = _matrix(scores)
    top = -np.sort(-array, axis=1)[:, :k]
    spread = array.std(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        found = (top.mean(axis=1) - array.mean(axis=1)) / spread
    return np.where(spread > 0, found, 0.0)


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays
class TrustSignals:
    """Per test example, one method's signals."""

    agreement: np.ndarray  # [n_test], in [0, 1]; NaN when there is no other method
    margin: np.ndarray  # [n_test]


def trust_signals(
    scores: Mapping[str, torch.Tensor | np.ndarray], k: int | None = None
) -> dict[str, TrustSignals]:
    """Each method's signals for every test row of its ``[n_test, n_train]`` scores (all methods the same
    shape). ``k`` defaults to :func:`trust_k` of the training set."""
    arrays = {name: _matrix(matrix) for name, matrix in scores.items()}
    shapes = {array.shape for array in arrays.values()}
    if len(shapes) != 1:
        raise DataError(f"the methods' scores differ in shape: {sorted(shapes)}")
    (shape,) = shapes
    k = trust_k(shape[1]) if k is None else k
    masks = {name: _top_mask(array, k) for name, array in arrays.items()}
    found = {}
    for name, mask in masks.items():
        others = [other for other in masks if other != name]
        shared = [(mask & masks[other]).sum(axis=1) / k for other in others]
        agreement = np.mean(shared, axis=0) if shared else np.full(shape[0], np.nan)
        found[name] = TrustSignals(agreement=agreement, margin=margins(arrays[name], k))
    return found


@dataclass(frozen=True)
class TrustModel:
    """Predicted per-test LDS = intercept + agreement_weight x agreement + margin_weight x margin; verdict
    ``low`` below ``low``, ``high`` at or above ``high``, ``medium`` between."""

    intercept: float
    agreement_weight: float
    margin_weight: float
    low: float
    high: float
    fitted_on: tuple[str, ...] = ()  # what the fit saw, e.g. "grammars/hessian-free" per method and task

    def predict(self, signals: TrustSignals) -> np.ndarray:
        """``[n_test]`` predicted LDS; NaN where agreement is undefined (a single method)."""
        return (
            self.intercept + self.agreement_weight * signals.agreement + self.margin_weight * signals.margin
        )

    def verdicts(self, signals: TrustSignals) -> list[str]:
        """One of :data:`VERDICTS` per test example, or ``"unknown"`` without a second method."""
        return [verdict_of(value, self.low, self.high) for value in self.predict(signals).tolist()]

    def calibrated_for(self, method: str) -> bool:
        """Whether the fit saw ``method`` on some task (its verdicts for another method extrapolate)."""
        return any(entry.rpartition("/")[2] == method for entry in self.fitted_on)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fitted_on": list(self.fitted_on)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> TrustModel:
        return cls(
            intercept=float(record["intercept"]),
            agreement_weight=float(record["agreement_weight"]),
            margin_weight=float(record["margin_weight"]),
            low=float(record["low"]),
            high=float(record["high"]),
            fitted_on=tuple(record.get("fitted_on", ())),
        )


def verdict_of(predicted: float, low: float, high: float) -> str:
    if np.isnan(predicted):
        return "unknown"
    return "high" if predicted >= high else "low" if predicted < low else "medium"


def fit_trust_model(
    samples: Sequence[tuple[str, TrustSignals, np.ndarray]],
) -> TrustModel:
    """Least-squares fit of measured per-test LDS on the signals over ``(name, signals, lds)`` samples
    (one per method and task), thresholds at the terciles of the fitted predictions, so that on the
    fitting data each verdict holds a third of the (method, test) pairs. Pairs with an undefined signal
    or LDS are left out."""
    agreement = np.concatenate([signals.agreement for _, signals, _ in samples])
    margin = np.concatenate([signals.margin for _, signals, _ in samples])
    lds = np.concatenate([np.asarray(values, dtype=np.float64) for _, _, values in samples])
    kept = np.isfinite(agreement) & np.isfinite(margin) & np.isfinite(lds)
    if kept.sum() < 3:
        raise DataError(
            f"a trust model needs at least 3 (method, test) pairs with LDS, got {int(kept.sum())}"
        )
    design = np.column_stack([np.ones(int(kept.sum())), agreement[kept], margin[kept]])
    coefficients, *_ = np.linalg.lstsq(design, lds[kept], rcond=None)
    predicted = design @ coefficients
    low, high = np.quantile(predicted, [1 / 3, 2 / 3])
    return TrustModel(
        float(coefficients[0]),
        float(coefficients[1]),
        float(coefficients[2]),
        float(low),
        float(high),
        tuple(name for name, _, _ in samples),
    )


def shipped_trust_model() -> TrustModel | None:
    """The calibration shipped with the package (``None`` if it is missing)."""
    path = resources.files(__package__).joinpath(CALIBRATION_FILE)
    if not path.is_file():
        return None
    return TrustModel.from_dict(json.loads(path.read_text())["model"])


def trust_readings(scores: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per method, what ``results.json`` keeps: every test example's verdict by the shipped calibration
    (none without one), its signals, and the count of each verdict."""
    model = shipped_trust_model()
    if model is None:
        return {}
    found = {}
    for name, signals in trust_signals(scores).items():
        verdicts = model.verdicts(signals)
        found[name] = {
            "verdicts": verdicts,
            "counts": {verdict: verdicts.count(verdict) for verdict in (*VERDICTS, "unknown")},
            "agreement": _listed(signals.agreement),
            "margin": _listed(signals.margin),
            "predicted_lds": _listed(model.predict(signals)),
            "calibrated": model.calibrated_for(name),
        }
    return found


def _listed(values: np.ndarray) -> list[float | None]:
    """JSON-ready: NaN (undefined) as None."""
    return [None if np.isnan(x) else float(x) for x in values.tolist()]
