"""Prompt templates and tokenisation: how an :class:`Example` becomes input ids and loss labels.

The prompt part and the response part are tokenised separately and concatenated, so the boundary
between them is exact (needed for response-only loss) and identical for training, gradients and
generation. By default (``padding="mask"``) the response is followed by one EOS token that is part of the
loss, so the model learns to stop, and padding is masked out of the loss.

``padding="study"`` reproduces the study's official preprocessing instead (its ``utils.py``: the tokenizer
called with ``padding="max_length"`` after ``padding_side = "left"`` and ``pad_token = eos_token``, then
``labels = input_ids``): no EOS is appended after the response, every example is LEFT-padded to
``max_length`` with EOS, the pads get attention mask 0 (the tokenizer's mask) but keep their labels, so the
loss also counts predicting them, and positions run 0..max_length-1 over pads and tokens alike (what the
model computes when given no position ids, as the official code gives none). Generation never sees those
pads: it tokenises the rendered prompt alone (:mod:`llm_attribution.models.generate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..core.errors import DataError
from ..core.settings import option, require, require_choice, require_positive
from .chat import chat_tokens
from .schema import Example

TEMPLATES = ("study", "chat")
CHAT_LOSS = ("assistant", "all")
LOSS_ON = ("all", "response")
PADDING = ("mask", "study")
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
    padding: str = option(
        "mask",
        "mask: pad each batch to its longest example, padding out of the loss, EOS after the response; "
        "study: the study's official preprocessing (every example left-padded to --max-length with EOS, "
        "pads with attention mask 0 but labelled, so the loss counts predicting them; no EOS appended)",
        choices=PADDING,
        recorded_at_default=False,
    )
    chat_loss: str = option(
        "assistant",
        "chat-format data (a 'messages' field): the tokens the loss counts, assistant: every assistant "
        "turn; all: the whole conversation (always rendered by the model's chat template)",
        choices=CHAT_LOSS,
        recorded_at_default=False,
    )

    def __post_init__(self) -> None:
        require_choice("template", self.template, TEMPLATES)
        require_choice("loss_on", self.loss_on, LOSS_ON)
        require_choice("padding", self.padding, PADDING)
        require_choice("chat_loss", self.chat_loss, CHAT_LOSS)
        require_positive("max_length", self.max_length)
        # The official code labels every token; masking the prompt while labelling pads reproduces nothing.
        require(
            self.padding == "mask" or self.loss_on == "all",
            "--padding study reproduces the study's loss over the whole sequence; use it with --loss-on all",
        )


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: ids and labels of equal length (labels are IGNORE_INDEX where not scored).

    ``pad_prefix`` leading tokens are the study's padding (``padding="study"``): part of the example, with
    positions and labels, but attention mask 0. ``prompt_length`` counts the prompt's tokens after them.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_length: int
    pad_prefix: int = 0

    @property
    def last_prompt_index(self) -> int:
        """Index of the prompt's last token in ``input_ids`` (where RepSim reads the hidden state)."""
        return self.pad_prefix + self.prompt_length - 1


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
    """Tokenise one example: prompt ids, then response ids and EOS, truncated to ``max_length``; with
    ``padding="study"`` no EOS, left-padded to ``max_length`` with labelled EOS pads. A chat-format example
    is its conversation as the chat template renders it (:func:`encode_chat`)."""
    if example.messages:
        return encode_chat(example, tokenizer, settings)
    prompt_ids = tokenizer(render_prompt(example.prompt, tokenizer, settings), add_special_tokens=True)[
        "input_ids"
    ]
    response_ids = tokenizer(_response_text(example.response, settings), add_special_tokens=False)[
        "input_ids"
    ]
    ending = [tokenizer.eos_token_id] if settings.padding == "mask" else []
    ids = (list(prompt_ids) + list(response_ids) + ending)[: settings.max_length]
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
    pads = settings.max_length - len(ids) if settings.padding == "study" else 0
    # the official code pads with EOS (its pad token) and labels the pads with their own ids
    padded = [tokenizer.eos_token_id] * pads
    return Encoded(tuple(padded + ids), tuple(padded + labels), n_prompt, pad_prefix=pads)


def encode_chat(example: Example, tokenizer: PreTrainedTokenizerBase, settings: PromptSettings) -> Encoded:
    """A conversation's tokens, truncated to ``max_length``, labelled on its assistant turns (or all of it,
    ``chat_loss="all"``); its "prompt" is everything before the last assistant turn, so RepSim reads the
    hidden state where the model starts that answer."""
    where = f"example {example.id}"
    if settings.padding == "study":
        raise DataError(f"{where}: --padding study reproduces the study's prompt/response data, not chats")
    ids, spans = chat_tokens(example.messages, tokenizer, where)
    ids = ids[: settings.max_length]
    if settings.chat_loss == "all":
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start : min(end, len(ids))]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise DataError(f"{where}: no assistant token is left within --max-length {settings.max_length}")
    n_prompt = min(spans[-1][0], len(ids) - 1)
    return Encoded(tuple(ids), tuple(labels[: len(ids)]), n_prompt)


def encode_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, settings: PromptSettings
) -> list[Encoded]:
    return [encode_example(e, tokenizer, settings) for e in examples]


def collate(
    batch: Sequence[Encoded], pad_id: int, padding_side: str = "right", width: int = 0
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (or to ``width`` if longer); padding gets attention mask 0 and
    label IGNORE_INDEX. An example's own study pads (``pad_prefix``) keep their labels and positions and
    get attention mask 0, as the official code gives them.

    Position ids are given explicitly (counting the example's own tokens only), so left and right padding
    give every example exactly the same positions, hence the same logits and gradients.
    """
    width = max(width, *(len(e.input_ids) for e in batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    present = torch.zeros((len(batch), width), dtype=torch.long)  # the example's own tokens, study pads too
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        start = 0 if padding_side == "right" else width - n
        ids[row, start : start + n] = torch.tensor(e.input_ids)
        labels[row, start : start + n] = torch.tensor(e.labels)
        present[row, start : start + n] = 1
        mask[row, start + e.pad_prefix : start + n] = 1
    positions = (present.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
