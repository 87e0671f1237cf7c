from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llm_attribution.core.errors import ConfigError
from llm_attribution.data.templates import PromptSettings, collate, encode_examples
from llm_attribution.models.finetune import TrainSettings, finetune
from llm_attribution.models.lora import attach_lora, load_adapter, lora_parameters
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from llm_attribution.workflows.layout import adapter_dir, checkpoints, saved_epochs
from tests.helpers import toy_task

PROMPT = PromptSettings(max_length=48)
FAST = TrainSettings(epochs=3, batch_size=4, learning_rate=3e-3, seed=7)


def _train(run, settings: TrainSettings = FAST):
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    torch.manual_seed(settings.seed)
    model = attach_lora(loaded.model, LoraSettings())
    curve = finetune(model, loaded.tokenizer, toy_task().train, PROMPT, settings, checkpoints(run))
    return model, loaded.tokenizer, curve


def test_tiny_finetuning_lowers_the_loss_and_saves_every_epoch(tmp_path) -> None:
    _, _, curve = _train(tmp_path)
    assert curve.epochs[-1] < curve.epochs[0]
    assert len(curve.steps) == 3 * 6  # 24 examples / batch 4, 3 epochs
    assert saved_epochs(tmp_path) == [1, 2, 3]
    for epoch in (1, 2, 3):
        assert (adapter_dir(tmp_path, epoch) / "adapter_model.safetensors").is_file()


def test_same_seed_gives_identical_adapters(tmp_path) -> None:
    _train(tmp_path / "a")
    _train(tmp_path / "b")
    _train(tmp_path / "c", TrainSettings(epochs=3, batch_size=4, learning_rate=3e-3, seed=8))
    a, b, c = (load_file(adapter_dir(tmp_path / r, 3) / "adapter_model.safetensors") for r in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_saved_adapter_reloads_to_the_trained_model(tmp_path) -> None:
    model, tokenizer, _ = _train(tmp_path)
    batch = collate(encode_examples(toy_task().test, tokenizer, PROMPT), tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(**batch).logits
    base = load_model(ModelSettings(model="tiny", device="cpu"))
    reloaded = load_adapter(base.model, adapter_dir(tmp_path, 3))
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-6)
    names = list(
        lora_parameters(
            load_adapter(
                load_model(ModelSettings(model="tiny")).model, adapter_dir(tmp_path, 1), trainable=True
            )
        )
    )
    assert names and all("lora_A" in n or "lora_B" in n for n in names)


def test_study_lora_defaults() -> None:
    lora = LoraSettings()
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_targets) == (
        4,
        32,
        0.1,
        ("q_proj", "v_proj"),
    )
    assert (PromptSettings().max_length, PromptSettings().template, PromptSettings().loss_on) == (
        128,
        "study",
        "all",
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"batch_size": -1},
        {"learning_rate": 0.0},
        {"learning_rate": float("nan")},
        {"weight_decay": -1.0},
    ],
)
def test_bad_train_settings(kwargs) -> None:
    with pytest.raises(ConfigError):
        TrainSettings(**kwargs)


def test_unknown_lora_target_names_the_modules() -> None:
    from llm_attribution.core.errors import ModelError

    loaded = load_model(ModelSettings(model="tiny"))
    with pytest.raises(ModelError, match="k_proj"):
        attach_lora(loaded.model, LoraSettings(lora_targets=("qq_proj",)))


def test_study_padding_trains_on_the_official_loss_and_generates_unpadded(tmp_path) -> None:
    """A fine-tuning batch under ``padding="study"`` has the official Trainer's loss (every example the
    same length, so the batch's token mean is the mean of the examples' official losses), and generation
    is unaffected: it starts from the rendered prompt, never from padded training ids."""
    from llm_attribution.models.generate import generate_answers

    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = toy_task().train[:4]
    study = PromptSettings(max_length=40, padding="study")
    batch = collate(encode_examples(examples, tokenizer, study), tokenizer.pad_token_id)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        texts = [f"[INST] {e.prompt} [/INST] {e.response}" for e in examples]
        official = tokenizer(texts, truncation=True, padding="max_length", max_length=40, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        ours = model(**batch).loss
        theirs = torch.stack(
            [
                model(input_ids=ids[None], attention_mask=mask[None], labels=ids[None]).loss
                for ids, mask in zip(official["input_ids"], official["attention_mask"], strict=True)
            ]
        ).mean()
    assert torch.allclose(ours, theirs, atol=1e-5)
    prompts = [e.prompt for e in examples[:2]]
    assert generate_answers(model, tokenizer, prompts, study, max_new_tokens=4) == generate_answers(
        model, tokenizer, prompts, PromptSettings(max_length=40), max_new_tokens=4
    )
