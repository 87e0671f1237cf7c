from __future__ import annotations

import pytest

from llm_attribution.core.errors import ConfigError, DataError
from llm_attribution.data.schema import Example
from llm_attribution.data.templates import (
    IGNORE_INDEX,
    PromptSettings,
    collate,
    encode_example,
    render_prompt,
)
from llm_attribution.models.tiny import byte_tokenizer

EXAMPLE = Example("e1", "What is 2+2?", "4", "math")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_study_template_is_the_papers(tokenizer) -> None:
    assert render_prompt("hi", tokenizer, PromptSettings()) == "[INST] hi [/INST]"
    enc = encode_example(EXAMPLE, tokenizer, PromptSettings())
    text = tokenizer.decode(enc.input_ids, skip_special_tokens=False)
    assert text == "[INST] What is 2+2? [/INST] 4</s>"
    assert enc.labels == enc.input_ids  # whole-sequence loss, as in the study


def test_response_only_loss_masks_the_prompt(tokenizer) -> None:
    enc = encode_example(EXAMPLE, tokenizer, PromptSettings(loss_on="response"))
    n = enc.prompt_length
    assert all(label == IGNORE_INDEX for label in enc.labels[:n])
    assert tokenizer.decode([t for t in enc.labels[n:]]) == " 4</s>"


def test_chat_template_renders_user_turn(tokenizer) -> None:
    text = render_prompt("hi", tokenizer, PromptSettings(template="chat"))
    assert text.startswith("<|im_start|>user\nhi") and text.endswith("assistant\n")


def test_truncation_and_response_loss_needing_room(tokenizer) -> None:
    enc = encode_example(EXAMPLE, tokenizer, PromptSettings(max_length=10))
    assert len(enc.input_ids) == 10
    with pytest.raises(DataError, match="max-length"):
        encode_example(EXAMPLE, tokenizer, PromptSettings(max_length=10, loss_on="response"))


def test_collate_pads_right_and_masks_padding(tokenizer) -> None:
    short = encode_example(Example("a", "x", "y", "l"), tokenizer, PromptSettings())
    long = encode_example(EXAMPLE, tokenizer, PromptSettings())
    batch = collate([short, long], tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "kwargs", [{"max_length": 0}, {"template": "alpaca"}, {"loss_on": "prompt"}, {"max_length": -3}]
)
def test_bad_prompt_settings(kwargs) -> None:
    with pytest.raises(ConfigError):
        PromptSettings(**kwargs)
