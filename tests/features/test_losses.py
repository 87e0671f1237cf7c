"""Batched per-example losses equal one forward pass per example, for both losses and both paddings."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.data.templates import IGNORE_INDEX, PromptSettings, collate, encode_examples
from llm_attribution.features.gradients import per_example_losses
from llm_attribution.features.losses import example_losses
from llm_attribution.models.lora import attach_lora
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from tests.helpers import toy_task


@pytest.mark.parametrize("padding", ["mask", "study"])
def test_batched_losses_equal_one_example_at_a_time(padding: str) -> None:
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings())
    examples = toy_task(n_train=7).train
    prompt = PromptSettings(max_length=40, padding=padding)
    got = example_losses(model, loaded.tokenizer, examples, prompt, batch_size=3)
    model.eval()
    for i, example in enumerate(examples):
        (encoded,) = encode_examples([example], loaded.tokenizer, prompt)
        batch = collate([encoded], loaded.tokenizer.pad_token_id)
        labels = batch.pop("labels")
        response = labels.clone()
        response[:, : encoded.pad_prefix + encoded.prompt_length] = IGNORE_INDEX  # the response tokens only
        with torch.no_grad():
            logits = model(**batch).logits
        assert float(got.attributed[i]) == pytest.approx(
            float(per_example_losses(logits, labels)[0][0]), rel=1e-5
        )
        assert float(got.response[i]) == pytest.approx(
            float(per_example_losses(logits, response)[0][0]), rel=1e-5
        )
    assert not torch.allclose(got.attributed, got.response)  # the prompt tokens count in one of them only


def test_response_loss_equals_the_loss_on_response_encoding() -> None:
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings())
    examples = toy_task(n_train=5).train
    whole = example_losses(model, loaded.tokenizer, examples, PromptSettings(max_length=40))
    response = example_losses(
        model, loaded.tokenizer, examples, PromptSettings(max_length=40, loss_on="response")
    )
    assert torch.allclose(whole.response, response.attributed, rtol=1e-6)
    assert torch.allclose(whole.response, response.response, rtol=1e-6)
