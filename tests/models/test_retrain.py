"""A retrain differs from the run only in its data: on the full training set it reproduces the run's
adapter bit for bit; on a subset it does not; and it starts each time from the same initial adapter."""

from __future__ import annotations

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from llm_attribution.data.templates import PromptSettings
from llm_attribution.models.finetune import TrainSettings, finetune
from llm_attribution.models.lora import ADAPTER_WEIGHTS, attach_lora
from llm_attribution.models.resolve import load_model
from llm_attribution.models.retrain import Retrainer
from llm_attribution.models.settings import LoraSettings, ModelSettings
from llm_attribution.models.tuning import FULL_WEIGHTS, FullWeights
from llm_attribution.workflows.layout import adapter_dir, checkpoints
from tests.helpers import toy_task

PROMPT = PromptSettings(max_length=48)
TRAIN = TrainSettings(epochs=2, batch_size=4, learning_rate=3e-3, seed=5)


def _weights(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_full_retrain_reproduces_the_run_and_subsets_differ(tmp_path) -> None:
    task = toy_task()
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    retrainer = Retrainer(loaded.model, loaded.tokenizer, LoraSettings(), seed=TRAIN.seed)
    # The run itself, trained afterwards on the same base (the retrainer copied it, leaving it untouched).
    torch.manual_seed(TRAIN.seed)
    run_model = attach_lora(loaded.model, LoraSettings())
    finetune(run_model, loaded.tokenizer, task.train, PROMPT, TRAIN, checkpoints(tmp_path / "run"))
    run_weights = load_file(adapter_dir(tmp_path / "run", TRAIN.epochs) / ADAPTER_WEIGHTS)

    half = retrainer.train(task.train[:12], PROMPT, TRAIN, tmp_path / "half")
    assert not (tmp_path / "half").exists()  # the retrain's training state is removed when done
    half_weights = _weights(retrainer.model)
    retrainer.train(task.train, PROMPT, TRAIN, tmp_path / "full")
    full_weights = _weights(retrainer.model)
    assert full_weights.keys() == run_weights.keys()
    assert all(torch.equal(full_weights[k], run_weights[k]) for k in run_weights)
    assert any(not torch.equal(half_weights[k], run_weights[k]) for k in run_weights)
    # Retraining the same subset again starts from the same adapter and random state: identical.
    again = retrainer.train(task.train[:12], PROMPT, TRAIN, tmp_path / "again")
    assert len(again.steps) == len(half.steps) and again.steps == half.steps
    assert all(torch.equal(_weights(retrainer.model)[k], half_weights[k]) for k in half_weights)


def test_full_fine_tuning_retrain_reproduces_the_run_and_restores_the_base(tmp_path) -> None:
    """--tuning full: the retrained weights are the base's own linear layers, restored before each retrain."""
    task = toy_task()
    full = LoraSettings(tuning="full")
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    retrainer = Retrainer(loaded.model, loaded.tokenizer, full, seed=TRAIN.seed)
    initial = retrainer.weights.state()
    retrainer.train(task.train[:12], PROMPT, TRAIN, tmp_path / "half")
    half = retrainer.weights.state()
    assert any(not torch.equal(half[k], initial[k]) for k in initial)  # it trained the base's weights
    base = dict(loaded.model.named_parameters())
    assert all(
        torch.equal(base[k], initial[k]) for k in initial
    )  # it trained a copy: the caller's base is as loaded

    torch.manual_seed(TRAIN.seed)  # the run, as `llm-attr run --tuning full` makes it
    weights = FullWeights(loaded.model, full.full_targets)
    finetune(
        loaded.model,
        loaded.tokenizer,
        task.train,
        PROMPT,
        TRAIN,
        checkpoints(tmp_path / "run"),
        weights=weights,
    )
    run_weights = load_file(adapter_dir(tmp_path / "run", TRAIN.epochs) / FULL_WEIGHTS)

    retrainer.train(task.train, PROMPT, TRAIN, tmp_path / "all")
    again = retrainer.weights.state()
    assert again.keys() == run_weights.keys()
    assert all(torch.equal(again[k], run_weights[k]) for k in run_weights)
    assert retrainer.restore() is retrainer.model
    restored = retrainer.weights.state()
    assert all(torch.equal(restored[k], initial[k]) for k in initial)
