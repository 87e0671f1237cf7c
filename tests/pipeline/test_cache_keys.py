"""Each stage's cache: a changed setting never gets a stored artefact, an unchanged one does (no recompute).

- fine-tuning: a run folder holds one setting; asked for another (model, data content, template, max length,
  loss masking, padding, dtype, LoRA, training) it refuses, and with the same settings it reuses the adapters,
- features: keyed by model, adapter weights, data content, template, max length, loss masking, padding
  and dtype,
- scores: keyed by the features' keys and every option of the method.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from llm_attribution import api
from llm_attribution.core.errors import RunError
from llm_attribution.data import DataSettings
from llm_attribution.data.templates import PromptSettings
from llm_attribution.features.gradients import GradientSettings
from llm_attribution.models.finetune import TrainSettings
from llm_attribution.models.settings import LoraSettings, ModelSettings
from llm_attribution.scoring import engine
from llm_attribution.workflows import features as scoring
from llm_attribution.workflows import runs as pipeline
from llm_attribution.workflows.features import RunFeatures
from llm_attribution.workflows.runs import FinetuneConfig, finetune_run, open_run, select_epoch


def _rows(n: int, start: int = 0) -> str:
    rows = [
        {"id": f"e{i}", "prompt": f"say {i}", "response": f"class {'ab'[i % 2]}", "label": "ab"[i % 2]}
        for i in range(start, start + n)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, FinetuneConfig]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cache")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(_rows(16))
    (data / "test.jsonl").write_text(_rows(4, start=100))
    config = FinetuneConfig(
        data=DataSettings(task=str(data)),
        model=ModelSettings(model="tiny", device="cpu"),
        prompt=PromptSettings(max_length=48),
        train=TrainSettings(epochs=2, batch_size=4),
    )
    finetune_run(config, root / "run")
    api.attribute(root / "run", methods=("hessian-free", "datainf", "repsim"))
    return root / "run", config


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """How often each stage computed something: fine-tuning, feature shards per split, method scorings."""
    counts = {"finetune": 0, "train": 0, "test": 0, "score": 0}
    finetune, collect, score = pipeline.finetune, scoring.collect_features, engine.score_resumably

    def counting_finetune(*args, **kwargs):  # type: ignore[no-untyped-def]
        counts["finetune"] += 1
        return finetune(*args, **kwargs)

    def counting_collect(model, tokenizer, examples, *args, **kwargs):  # type: ignore[no-untyped-def]
        counts[kwargs["desc"].split()[0]] += 1
        return collect(model, tokenizer, examples, *args, **kwargs)

    def counting_score(*args, **kwargs):  # type: ignore[no-untyped-def]
        counts["score"] += 1
        return score(*args, **kwargs)

    monkeypatch.setattr(pipeline, "finetune", counting_finetune)
    monkeypatch.setattr(scoring, "collect_features", counting_collect)
    monkeypatch.setattr(engine, "score_resumably", counting_score)
    return counts


# ------------------------------------------------------------------------------------------- fine-tuning

CHANGES = {
    "model": lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, model="embedded")),
    "dtype": lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, dtype="bfloat16")),
    "template": lambda c: dataclasses.replace(c, prompt=dataclasses.replace(c.prompt, template="chat")),
    "max_length": lambda c: dataclasses.replace(c, prompt=dataclasses.replace(c.prompt, max_length=40)),
    "loss_on": lambda c: dataclasses.replace(c, prompt=dataclasses.replace(c.prompt, loss_on="response")),
    "padding": lambda c: dataclasses.replace(c, prompt=dataclasses.replace(c.prompt, padding="study")),
    "lora_r": lambda c: dataclasses.replace(c, lora=LoraSettings(lora_r=2)),
    "learning_rate": lambda c: dataclasses.replace(c, train=dataclasses.replace(c.train, learning_rate=1e-3)),
    "train_limit": lambda c: dataclasses.replace(c, data=dataclasses.replace(c.data, train_limit=10)),
}


@pytest.mark.parametrize("setting", CHANGES)
def test_finetuning_refuses_a_changed_setting(run, calls, setting: str) -> None:
    folder, config = run
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(RunError, match=f"other settings.*{setting}"):
        finetune_run(CHANGES[setting](config), folder)
    assert calls["finetune"] == 0 and sorted(p.name for p in folder.iterdir()) == before


def test_finetuning_refuses_changed_data_content(run, calls) -> None:
    """Same path, same settings, one response edited: the data's fingerprint tells them apart."""
    folder, config = run
    train_file = folder.parent / "data" / "train.jsonl"
    original = train_file.read_text()
    train_file.write_text(original.replace("class a", "class A", 1))
    try:
        with pytest.raises(RunError, match=r"other settings.*fingerprint\.train"):
            finetune_run(config, folder)
    finally:
        train_file.write_text(original)
    assert calls["finetune"] == 0


def test_finetuning_reuses_the_same_settings(run, calls) -> None:
    folder, config = run
    report = finetune_run(config, folder)
    assert report.reused and calls["finetune"] == 0


# ---------------------------------------------------------------------------------------------- features


def _collect(loaded_run, config: FinetuneConfig, **changes) -> None:  # type: ignore[no-untyped-def]
    prompt = dataclasses.replace(config.prompt, **changes.pop("prompt", {}))
    model = dataclasses.replace(config.model, **changes.pop("model", {}))
    RunFeatures(loaded_run, prompt, GradientSettings(), model, shard_size=256).in_memory()


FEATURE_CHANGES = {
    "template": {"prompt": {"template": "chat"}},
    "max_length": {"prompt": {"max_length": 40}},
    "loss_on": {"prompt": {"loss_on": "response"}},
    "padding": {"prompt": {"padding": "study"}},
    "dtype": {"model": {"dtype": "bfloat16"}},
}


@pytest.mark.parametrize("setting", FEATURE_CHANGES)
def test_features_are_recomputed_when_a_setting_changes(run, calls, tmp_path, setting: str) -> None:
    folder = Path(shutil.copytree(run[0], tmp_path / "run"))
    loaded_run = open_run(folder)
    _collect(loaded_run, run[1])
    assert (calls["train"], calls["test"]) == (0, 0)  # unchanged: read from the store
    _collect(loaded_run, run[1], **FEATURE_CHANGES[setting])
    assert (calls["train"], calls["test"]) == (1, 1)


def test_features_are_recomputed_for_other_model_adapter_or_data(run, calls, tmp_path) -> None:
    folder = Path(shutil.copytree(run[0], tmp_path / "run"))
    loaded_run = open_run(folder)
    loaded_run.base.spec = "another-model"  # what RunFeatures.identity reads as the model
    _collect(loaded_run, run[1])
    assert (calls["train"], calls["test"]) == (1, 1)
    loaded_run = open_run(folder)
    _collect(select_epoch(loaded_run, 1), run[1])  # the adapter of epoch 1: other weights
    assert (calls["train"], calls["test"]) == (2, 2)
    # one training response changed: the training split is recomputed, the test split reused
    train = list(loaded_run.task.train)
    train[0] = dataclasses.replace(train[0], response=train[0].response + "!")
    task = dataclasses.replace(loaded_run.task, train=tuple(train))
    _collect(dataclasses.replace(loaded_run, task=task), run[1])
    assert (calls["train"], calls["test"]) == (3, 2)


# ------------------------------------------------------------------------------------------------ scores


def test_scores_are_reused_when_nothing_changed(run, calls, tmp_path) -> None:
    folder = Path(shutil.copytree(run[0], tmp_path / "run"))
    before = json.loads((folder / "results.json").read_text())
    again = api.attribute(folder, methods=("hessian-free", "datainf", "repsim"))
    assert calls == {"finetune": 0, "train": 0, "test": 0, "score": 0}
    assert again["methods"] == before["methods"]  # metrics, settings and recorded seconds alike


def test_scores_are_recomputed_for_changed_method_options(run, calls, tmp_path) -> None:
    folder = Path(shutil.copytree(run[0], tmp_path / "run"))
    before = json.loads((folder / "results.json").read_text())["methods"]
    after = api.attribute(
        folder, methods=("hessian-free", "datainf", "repsim"), method_options=("datainf.damping_scale=0.5",)
    )["methods"]
    assert calls["score"] == 1  # datainf only
    assert after["datainf"]["settings"]["damping_scale"] == 0.5
    assert after["hessian-free"] == before["hessian-free"]
    api.attribute(folder, methods=("datainf",), method_options=("datainf.chunk_size=3",))
    assert calls["score"] == 2


def test_scores_are_recomputed_for_another_adapter(run, calls, tmp_path) -> None:
    folder = Path(shutil.copytree(run[0], tmp_path / "run"))
    api.attribute(folder, methods=("hessian-free", "repsim"), epoch=1)
    assert calls["score"] == 2 and (calls["train"], calls["test"]) == (1, 1)


def test_a_damaged_scores_file_is_recomputed(run, calls, tmp_path, caplog) -> None:
    folder = Path(shutil.copytree(run[0], tmp_path / "run"))
    path = folder / "scores" / "datainf.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    before = json.loads((folder / "results.json").read_text())["methods"]["datainf"]
    after = api.attribute(folder, methods=("hessian-free", "datainf"))["methods"]["datainf"]
    assert calls["score"] == 1
    assert "datainf.safetensors is damaged" in caplog.text
    assert (after["accuracy"], after["coverage"]) == (before["accuracy"], before["coverage"])
