"""Prompt templates and tokenisation: how an :class:`Example` becomes input ids and loss labels.

The prompt part and the response part are tokenised separately and concatenated, so the boundary
between them is exact (needed for response-only loss) and identical for training, gradients and
generation. The response is followed by one EOS token that is part of the loss, so the model learns to
stop; padding is always masked out of the loss (the study's code kept it in; see DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..core.errors import DataError
from ..core.settings import option, require_choice, require_positive
from .schema import Example

TEMPLATES = ("study", "chat")
LOSS_ON = ("all", "response")
IGNORE_INDEX = -100
STUDY_PROMPT = "[INST] {prompt} [/INST]"


@dataclass(frozen=True)
class PromptSettings:
    """How examples are rendered and which tokens the loss counts."""

    template: str = option(
        "study",
        "study: '[INST] {prompt} [/INST] {response}' as in the study; chat: the model's own chat template",
        choices=TEMPLATES,
    )
    max_length: int = option(128, "tokens per example; longer examples are truncated at the end")
    loss_on: str = option(
        "all",
        "all: loss over the whole sequence (the study's); response: the response tokens only",
        choices=LOSS_ON,
    )

    def __post_init__(self) -> None:
        require_choice("template", self.template, TEMPLATES)
        require_choice("loss_on", self.loss_on, LOSS_ON)
        require_positive("max_length", self.max_length)


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: ids and labels of equal length (labels are IGNORE_INDEX where not scored)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_length: int


def render_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase, settings: PromptSettings) -> str:
    """The text the model sees before its answer (also what generation and RepSim start from)."""
    if settings.template == "study":
        return STUDY_PROMPT.format(prompt=prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("--template chat: this model's tokenizer has no chat template; use --template study")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return str(text)


def _response_text(response: str, settings: PromptSettings) -> str:
    return f" {response}" if settings.template == "study" else response


def encode_example(example: Example, tokenizer: PreTrainedTokenizerBase, settings: PromptSettings) -> Encoded:
    """Tokenise one example: prompt ids, then response ids and EOS, truncated to ``max_length``."""
    prompt_ids = tokenizer(render_prompt(example.prompt, tokenizer, settings), add_special_tokens=True)[
        "input_ids"
    ]
    response_ids = tokenizer(_response_text(example.response, settings), add_special_tokens=False)[
        "input_ids"
    ]
    ids = (list(prompt_ids) + list(response_ids) + [tokenizer.eos_token_id])[: settings.max_length]
    n_prompt = min(len(prompt_ids), len(ids))
    if settings.loss_on == "response":
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        if n_prompt == len(ids):
            raise DataError(
                f"example {example.id}: the prompt fills all {settings.max_length} tokens, so no response "
                "token is left for --loss-on response; raise --max-length"
            )
    else:
        labels = list(ids)
    return Encoded(input_ids=tuple(ids), labels=tuple(labels), prompt_length=n_prompt)


def encode_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, settings: PromptSettings
) -> list[Encoded]:
    return [encode_example(e, tokenizer, settings) for e in examples]


def collate(
    batch: Sequence[Encoded], pad_id: int, padding_side: str = "right", width: int = 0
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (or to ``width`` if longer); padding gets attention mask 0 and
    label IGNORE_INDEX.

    Position ids are given explicitly (counting real tokens only), so left and right padding give every
    example exactly the same positions, hence the same logits and gradients.
    """
    width = max(width, *(len(e.input_ids) for e in batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(e.input_ids)
        labels[row, cols] = torch.tensor(e.labels)
        mask[row, cols] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
