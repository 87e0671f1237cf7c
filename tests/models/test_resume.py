"""A fine-tuning run stopped after an epoch, or mid-epoch after any step, resumes there and ends with the
uninterrupted run's adapters and loss curve, bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from llm_attribution.data import DataSettings
from llm_attribution.models import finetune as finetune_module
from llm_attribution.models.finetune import TrainSettings
from llm_attribution.models.settings import ModelSettings
from llm_attribution.workflows.layout import adapter_dir
from llm_attribution.workflows.runs import FinetuneConfig, finetune_run

CONFIG = FinetuneConfig(
    data=DataSettings(task="grammars", train_limit=40, test_limit=5),
    model=ModelSettings(model="tiny", device="cpu"),
    train=TrainSettings(epochs=3, batch_size=4, learning_rate=3e-3, seed=3),
)


class Crash(Exception):
    pass


def _crash_once_at(monkeypatch, when) -> None:  # type: ignore[no-untyped-def]
    """Raise Crash right after the first saved state for which ``when(state)`` holds (as a kill would)."""
    original = finetune_module._save_state

    def crashing(run, state):  # type: ignore[no-untyped-def]
        original(run, state)
        if when(state):
            monkeypatch.setattr(finetune_module, "_save_state", original)
            raise Crash

    monkeypatch.setattr(finetune_module, "_save_state", crashing)


def _assert_same_adapters(a_run, b_run) -> None:  # type: ignore[no-untyped-def]
    for epoch in (1, 2, 3):
        a = load_file(str(adapter_dir(a_run, epoch) / "adapter_model.safetensors"))
        b = load_file(str(adapter_dir(b_run, epoch) / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), epoch


@pytest.fixture(scope="module")
def whole(tmp_path_factory):  # type: ignore[no-untyped-def]
    run = tmp_path_factory.mktemp("whole") / "run"
    return run, finetune_run(CONFIG, run)


def test_resume_after_an_epoch_equals_an_uninterrupted_run(whole, tmp_path, monkeypatch) -> None:
    _crash_once_at(monkeypatch, lambda state: state["epoch"] == 1 and state["step"] == 0)
    with pytest.raises(Crash):
        finetune_run(CONFIG, tmp_path / "cut")
    resumed = finetune_run(CONFIG, tmp_path / "cut")
    assert not resumed.reused
    assert resumed.curve.epochs == whole[1].curve.epochs
    assert resumed.curve.steps == whole[1].curve.steps
    _assert_same_adapters(whole[0], tmp_path / "cut")


@pytest.mark.parametrize(("epoch", "step"), [(0, 3), (1, 7)])
def test_resume_mid_epoch_equals_an_uninterrupted_run(whole, tmp_path, monkeypatch, epoch, step) -> None:
    """Checkpoints after every step (checkpoint_minutes=0); a crash after one resumes at the next step."""
    config = dataclasses.replace(CONFIG, train=dataclasses.replace(CONFIG.train, checkpoint_minutes=0.0))
    _crash_once_at(monkeypatch, lambda state: state["epoch"] == epoch and state["step"] == step)
    with pytest.raises(Crash):
        finetune_run(config, tmp_path / "cut")
    state = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (epoch, step)  # really stopped mid-epoch
    resumed = finetune_run(config, tmp_path / "cut")
    assert resumed.curve.steps == whole[1].curve.steps
    assert resumed.curve.epochs == whole[1].curve.epochs
    _assert_same_adapters(whole[0], tmp_path / "cut")


def test_checkpoint_frequency_is_not_a_recorded_setting(tmp_path) -> None:
    """A rerun with another --checkpoint-minutes resumes the same run instead of refusing it."""
    assert "checkpoint_minutes" not in CONFIG.to_dict()["train"]
    config = dataclasses.replace(CONFIG, train=dataclasses.replace(CONFIG.train, epochs=1))
    finetune_run(config, tmp_path / "r")
    other = dataclasses.replace(config, train=dataclasses.replace(config.train, checkpoint_minutes=0.0))
    assert finetune_run(other, tmp_path / "r").reused


def test_damaged_state_file_restarts_training(tmp_path, monkeypatch) -> None:
    run = tmp_path / "r"
    _crash_once_at(monkeypatch, lambda state: True)
    with pytest.raises(Crash):
        finetune_run(CONFIG, run)
    (run / "train_state.pt").write_bytes(b"garbage")
    again = finetune_run(CONFIG, run)
    assert len(again.curve.epochs) == 3
