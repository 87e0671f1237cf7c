"""The four-call Python API on the tiny model."""

from __future__ import annotations

import pytest

import llm_attribution
from llm_attribution.data import DataSettings
from llm_attribution.models.finetune import TrainSettings
from llm_attribution.models.settings import ModelSettings
from llm_attribution.workflows.runs import FinetuneConfig


def test_finetune_collect_attribute_evaluate(tmp_path) -> None:
    data = DataSettings(task="grammars", train_limit=40, test_limit=10)
    config = FinetuneConfig(data=data, model=ModelSettings(model="tiny"), train=TrainSettings(epochs=1))
    report = llm_attribution.finetune(config, tmp_path / "run")
    assert report.epochs == [1]
    train, test = llm_attribution.collect(tmp_path / "run")
    assert len(train.ids) == 40 and len(test.ids) == 10
    assert all(block.shape[0] == 40 for block in train.blocks.values())
    results = llm_attribution.attribute(tmp_path / "run", methods=("hessian-free", "repsim"))
    assert set(results["methods"]) == {"hessian-free", "repsim"}
    metrics = llm_attribution.evaluate(tmp_path / "run" / results["methods"]["repsim"]["scores"], data)
    assert metrics.accuracy == pytest.approx(results["methods"]["repsim"]["accuracy"])


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = llm_attribution.no_such_thing
