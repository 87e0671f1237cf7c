"""A fine-tuning run stopped after an epoch resumes there and ends with the uninterrupted run's adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llm_attribution.data import DataSettings
from llm_attribution.models import finetune as finetune_module
from llm_attribution.models.finetune import TrainSettings
from llm_attribution.models.settings import ModelSettings
from llm_attribution.pipeline import FinetuneConfig, finetune_run
from llm_attribution.run_layout import adapter_dir

CONFIG = FinetuneConfig(
    data=DataSettings(task="grammars", train_limit=40, test_limit=5),
    model=ModelSettings(model="tiny", device="cpu"),
    train=TrainSettings(epochs=3, batch_size=4, learning_rate=3e-3, seed=3),
)


class Crash(Exception):
    pass


def test_resume_after_an_epoch_equals_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    whole = finetune_run(CONFIG, tmp_path / "whole")

    original = finetune_module._save_state

    def crash_after_first(run, epoch, *args):
        original(run, epoch, *args)
        if epoch == 1:
            raise Crash  # as if the process were killed right after epoch 1 was saved

    monkeypatch.setattr(finetune_module, "_save_state", crash_after_first)
    with pytest.raises(Crash):
        finetune_run(CONFIG, tmp_path / "cut")
    monkeypatch.setattr(finetune_module, "_save_state", original)

    resumed = finetune_run(CONFIG, tmp_path / "cut")
    assert not resumed.reused
    assert resumed.curve.epochs == whole.curve.epochs
    assert resumed.curve.steps == whole.curve.steps
    for epoch in (1, 2, 3):
        a = load_file(str(adapter_dir(tmp_path / "whole", epoch) / "adapter_model.safetensors"))
        b = load_file(str(adapter_dir(tmp_path / "cut", epoch) / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), epoch


def test_damaged_state_file_restarts_training(tmp_path, monkeypatch) -> None:
    run = tmp_path / "r"
    original = finetune_module._save_state

    def crash(run_dir, epoch, *args):
        original(run_dir, epoch, *args)
        raise Crash

    monkeypatch.setattr(finetune_module, "_save_state", crash)
    with pytest.raises(Crash):
        finetune_run(CONFIG, run)
    monkeypatch.setattr(finetune_module, "_save_state", original)
    (run / "train_state.pt").write_bytes(b"garbage")
    again = finetune_run(CONFIG, run)
    assert len(again.curve.epochs) == 3
