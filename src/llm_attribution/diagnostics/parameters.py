"""Parameter change against behaviour change, epoch by epoch (the study's section 4.3).

Parameter change: ``||(alpha / r) B A||_F`` of every adapted module, from the saved adapters alone.
Behaviour: the mean test loss, and for tasks with triggered examples (labels starting with ``trigger``) the
rate at which a triggered test prompt makes the model produce its target response, judged from greedy
generations: a generation counts when it starts with the first ``PREFIX_WORDS`` words of the expected
response (case, spacing and punctuation ignored). The same rate on clean test prompts is reported as a
control.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from ..data.schema import Example
from ..data.templates import PromptSettings, collate, encode_examples
from ..features.gradients import per_example_losses
from ..models.generate import generate_answers
from ..pipeline import run_epochs
from ..run_layout import adapter_dir

PREFIX_WORDS = 5


def adapter_update_norms(adapter: Path) -> dict[str, float]:
    """``||(alpha / r) B A||_F`` per adapted module of a saved peft adapter (no model needed)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = float(config["lora_alpha"]) / float(config["r"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    norms = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.").removeprefix("model.")
        norms[module] = float(torch.linalg.matrix_norm(scaling * (b.double() @ a.double())))
    return norms


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _starts_like(generated: str, expected: str) -> bool:
    want = _words(expected)[:PREFIX_WORDS]
    return bool(want) and _words(generated)[: len(want)] == want


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prompt: PromptSettings,
) -> float:
    """Mean over examples of each example's own loss (as in the gradients), in batches of 8."""
    encoded = encode_examples(examples, tokenizer, prompt)
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(encoded), 8):
        batch = collate(encoded[start : start + 8], tokenizer.pad_token_id)
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        total += float(per_example_losses(logits, labels)[0].sum())
    return total / len(encoded)


@dataclass(frozen=True)
class ParameterRow:
    epoch: int
    update_norm_total: float
    update_norm_by_module: dict[str, float]
    test_loss: float
    trigger_rate: float | None
    clean_control_rate: float | None


def parameters_vs_behaviour(
    run: Path, max_generations: int = 20, max_new_tokens: int = 24
) -> list[ParameterRow]:
    """One row per saved epoch: adapter update norms, test loss, and (backdoor tasks) trigger rates."""
    rows = []
    for explained in run_epochs(run):
        epoch, config, test = typing.cast(int, explained.epoch), explained.config, explained.task.test
        triggered = [e for e in test if e.label.startswith("trigger")][:max_generations]
        clean = [e for e in test if not e.label.startswith("trigger")][:max_generations]
        norms = adapter_update_norms(adapter_dir(run, epoch))
        rates: list[float | None] = [None, None]
        if triggered:
            for i, group in enumerate((triggered, clean)):
                answers = generate_answers(
                    explained.model,
                    explained.tokenizer,
                    [e.prompt for e in group],
                    config.prompt,
                    max_new_tokens,
                )
                hits = [_starts_like(a, e.response) for a, e in zip(answers, group, strict=True)]
                rates[i] = sum(hits) / len(hits) if hits else None
        rows.append(
            ParameterRow(
                epoch=epoch,
                update_norm_total=float(torch.tensor(list(norms.values())).square().sum().sqrt()),
                update_norm_by_module=norms,
                test_loss=mean_loss(explained.model, explained.tokenizer, test, config.prompt),
                trigger_rate=rates[0],
                clean_control_rate=rates[1],
            )
        )
    return rows
