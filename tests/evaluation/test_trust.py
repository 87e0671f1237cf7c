"""The trust verdict: its signals against a brute-force count, its fit against a known linear world, and the
shipped calibration."""

from __future__ import annotations

import numpy as np
import pytest

from llm_attribution.core.errors import DataError
from llm_attribution.evaluation.trust import (
    VERDICTS,
    TrustModel,
    TrustSignals,
    fit_trust_model,
    margins,
    shipped_trust_model,
    trust_k,
    trust_readings,
    trust_signals,
    verdict_of,
)


def test_agreement_and_margin_equal_a_brute_force_count() -> None:
    rng = np.random.default_rng(0)
    scores = {name: rng.standard_normal((5, 40)) for name in ("a", "b", "c")}
    scores["c"][:, :] = scores["a"] + 0.01 * rng.standard_normal((5, 40))  # c nearly a: agrees with it
    k = 4
    found = trust_signals(scores, k=k)
    for name in scores:
        for test in range(5):
            mine = set(np.argsort(-scores[name][test])[:k])
            shared = [len(mine & set(np.argsort(-scores[o][test])[:k])) / k for o in scores if o != name]
            assert found[name].agreement[test] == pytest.approx(np.mean(shared))
            row = scores[name][test]
            expected = (np.sort(row)[::-1][:k].mean() - row.mean()) / row.std()
            assert found[name].margin[test] == pytest.approx(expected)
    assert (found["c"].agreement > found["b"].agreement).all()
    assert trust_k(40) == 4 and trust_k(5000) == 10 and trust_k(3) == 1


def test_a_single_method_or_a_flat_row_has_nothing_to_stand_on() -> None:
    alone = trust_signals({"a": np.random.default_rng(1).random((2, 30))})["a"]
    assert np.isnan(alone.agreement).all()
    assert margins(np.ones((2, 30)), 3).tolist() == [0.0, 0.0]
    model = TrustModel(0.0, 1.0, 0.0, 0.3, 0.6)
    assert model.verdicts(alone) == ["unknown", "unknown"]
    assert [verdict_of(x, 0.3, 0.6) for x in (0.1, 0.3, 0.59, 0.6)] == ["low", "medium", "medium", "high"]
    with pytest.raises(DataError, match="differ in shape"):
        trust_signals({"a": np.zeros((2, 3)), "b": np.zeros((2, 4))})


def test_fit_recovers_a_linear_world_and_cuts_it_in_thirds() -> None:
    rng = np.random.default_rng(2)
    samples = []
    for task in range(3):
        signals = TrustSignals(agreement=rng.random(30), margin=3 * rng.random(30))
        lds = 0.2 + 0.5 * signals.agreement + 0.1 * signals.margin
        samples.append((f"t{task}/m", signals, lds))
    model = fit_trust_model(samples)
    assert (model.intercept, model.agreement_weight, model.margin_weight) == pytest.approx((0.2, 0.5, 0.1))
    verdicts = [v for _, signals, _ in samples for v in model.verdicts(signals)]
    assert [verdicts.count(v) for v in VERDICTS] == pytest.approx([30, 30, 30], abs=1)
    assert TrustModel.from_dict(model.to_dict()) == model
    with pytest.raises(DataError, match="at least 3"):
        fit_trust_model([("x", TrustSignals(np.array([np.nan]), np.array([1.0])), np.array([0.5]))])


def test_the_shipped_calibration_loads_and_gives_one_verdict_per_test() -> None:
    model = shipped_trust_model()
    assert model is not None and model.low < model.high
    assert {name.split("/")[0] for name in model.fitted_on} >= {"grammars", "mixedS"}
    rng = np.random.default_rng(3)
    readings = trust_readings({"a": rng.random((4, 50)), "b": rng.random((4, 50))})
    assert len(readings["a"]["verdicts"]) == 4 and sum(readings["a"]["counts"].values()) == 4
    assert set(readings["a"]["verdicts"]) <= set(VERDICTS)


def test_a_method_the_calibration_never_saw_is_marked_as_an_extrapolation() -> None:
    model = shipped_trust_model()
    assert model is not None
    assert model.calibrated_for("hessian-free") and not model.calibrated_for("bm25")
    assert not model.calibrated_for("free")  # a method name, not a substring of one
    rng = np.random.default_rng(4)
    readings = trust_readings({"hessian-free": rng.random((2, 30)), "bm25": rng.random((2, 30))})
    assert readings["hessian-free"]["calibrated"] and not readings["bm25"]["calibrated"]
