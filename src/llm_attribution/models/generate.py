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
    batch_size: int = 1,
) -> list[str]:
    """Greedy answers, one per prompt, ``batch_size`` prompts per generation (left-padded, the padding
    masked and positions counted from each prompt's first token, so a batch gives each prompt the answer
    it gets alone)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(prompts), batch_size):
        texts = [render_prompt(p, tokenizer, settings) for p in prompts[start : start + batch_size]]
        encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        width = max(len(ids) for ids in encoded)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in out[:, width:]:
            answers.append(str(tokenizer.decode(row, skip_special_tokens=True)).strip())
    model.train(was_training)
    return answers
