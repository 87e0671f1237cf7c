from __future__ import annotations

import pytest
import torch

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


def _official(text: str, tokenizer, max_length: int) -> dict[str, list[int]]:
    """The study's official preprocessing (its utils.py), rebuilt from its description: the tokenizer pads
    on the left to max_length with EOS, and the labels are the input ids, pads included."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token
    try:
        out = tokenizer(text, truncation=True, padding="max_length", max_length=max_length)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    ids = out["input_ids"]
    return {"input_ids": ids, "attention_mask": out["attention_mask"], "labels": list(ids)}


def test_study_padding_is_the_official_construction(tokenizer) -> None:
    settings = PromptSettings(max_length=40, padding="study")
    short = Example("a", "x", "y", "l")
    encoded = [encode_example(e, tokenizer, settings) for e in (short, EXAMPLE)]
    batch = collate(encoded, tokenizer.pad_token_id)
    for row, example in enumerate((short, EXAMPLE)):
        official = _official(f"[INST] {example.prompt} [/INST] {example.response}", tokenizer, 40)
        for key in ("input_ids", "attention_mask", "labels"):
            assert batch[key][row].tolist() == official[key], key
    # pads: EOS ids, attention mask 0, labelled (counted in the loss); positions as the model's default
    first = batch["attention_mask"][0].tolist().index(1)
    assert first > 0 and (batch["input_ids"][0, :first] == tokenizer.eos_token_id).all()
    assert (batch["labels"][0, :first] == tokenizer.eos_token_id).all()
    assert (batch["position_ids"] == torch.arange(40)).all()


def test_study_padding_truncates_and_counts_every_token(tokenizer) -> None:
    enc = encode_example(EXAMPLE, tokenizer, PromptSettings(max_length=10, padding="study"))
    assert enc.pad_prefix == 0 and len(enc.input_ids) == 10 and enc.labels == enc.input_ids
    long = encode_example(EXAMPLE, tokenizer, PromptSettings(max_length=64, padding="study"))
    assert len(long.input_ids) == 64 and long.labels == long.input_ids
    text = tokenizer.decode(long.input_ids[long.pad_prefix :], skip_special_tokens=False)
    assert text == "[INST] What is 2+2? [/INST] 4"  # no EOS appended, as in the official code
    assert long.input_ids[long.last_prompt_index] == tokenizer("[INST] What is 2+2? [/INST]")["input_ids"][-1]


def test_study_padding_needs_the_whole_sequence_loss() -> None:
    with pytest.raises(ConfigError, match="loss-on all"):
        PromptSettings(padding="study", loss_on="response")
    with pytest.raises(ConfigError):
        PromptSettings(padding="right")


def test_default_padding_is_unchanged(tokenizer) -> None:
    assert PromptSettings().padding == "mask"
    enc = encode_example(EXAMPLE, tokenizer, PromptSettings())
    assert enc.pad_prefix == 0 and enc.input_ids[-1] == tokenizer.eos_token_id
