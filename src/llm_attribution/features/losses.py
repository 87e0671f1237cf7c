"""Each example's loss under a model, in batched forward passes: what ground-truth checks measure.

Two losses per example from the same forward pass: the one attribution explains (the mean token loss over
the labels of the run's ``PromptSettings``, exactly as :func:`.gradients.per_example_losses` defines it for
the gradients) and the response-only loss (the response tokens and the final EOS), which is the loss of
the behaviour a user sees, whatever ``--loss-on`` the run attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.schema import Example
from ..data.templates import IGNORE_INDEX, PromptSettings, collate, encode_examples
from ..models.device import autocast
from .gradients import per_example_losses


@dataclass(frozen=True)
class ExampleLosses:
    """Per-example mean token losses, in the examples' order (float64 vectors)."""

    attributed: torch.Tensor  # over the labels the run attributes (its --loss-on)
    response: torch.Tensor  # over the response tokens only (NaN where truncation left none)


def example_losses(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prompt: PromptSettings,
    batch_size: int = 16,
) -> ExampleLosses:
    """Both losses of every example, batched by length (padding never changes a loss); no dropout."""
    was_training = model.training
    model.eval()
    encoded = encode_examples(examples, tokenizer, prompt)
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    attributed = torch.empty(len(encoded), dtype=torch.float64)
    response = torch.empty(len(encoded), dtype=torch.float64)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = collate([encoded[i] for i in rows], tokenizer.pad_token_id)
                labels = batch.pop("labels").to(device)
                # The response tokens: the labels after each example's prompt (what loss_on=response keeps).
                after_prompt = (
                    torch.arange(labels.shape[1], device=device)[None, :]
                    >= torch.tensor(
                        [encoded[i].pad_prefix + encoded[i].prompt_length for i in rows], device=device
                    )[:, None]
                )
                response_labels = labels.masked_fill(~after_prompt, IGNORE_INDEX)
                with autocast(model):
                    logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits
                index = torch.tensor(rows)
                attributed[index] = per_example_losses(logits, labels)[0].double().cpu()
                loss, counts = per_example_losses(logits, response_labels)
                # A prompt that fills max_length leaves no response token: its response loss is undefined.
                response[index] = loss.double().masked_fill(counts == 0, float("nan")).cpu()
    finally:
        model.train(was_training)
    return ExampleLosses(attributed, response)


__all__ = ["ExampleLosses", "example_losses"]
