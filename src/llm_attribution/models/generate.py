"""Greedy generation of a response to a prompt, rendered with the run's template."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.templates import PromptSettings, render_prompt


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: PromptSettings,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers, one per prompt (generated one at a time: no padding effects, few prompts)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for prompt in prompts:
        text = render_prompt(prompt, tokenizer, settings)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"].to(device)
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.append(str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip())
    model.train(was_training)
    return answers
