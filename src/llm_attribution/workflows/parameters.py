"""Parameter change against behaviour change, epoch by epoch (the study's section 4.3).

Parameter change: ``||(alpha / r) B A||_F`` of every adapted module, from the saved adapters alone; with
``--tuning full``, ``||W_epoch - W_0||_F`` of every trained matrix against the base model's weights.
Behaviour: the mean test loss, and for tasks with triggered examples (labels starting with ``trigger``) the
rate at which a triggered test prompt makes the model produce its target behaviour, judged from greedy
generations. A target need not be one fixed string (the study's backdoor answers each triggered request with
its own compliance, its clean examples with refusals), so each generation is given the label of the training
response it resembles most (:func:`judge_labels`), and a triggered prompt counts when that label is its own.
The control is the rate at which clean test prompts produce a triggered class's behaviour.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..data.schema import Example
from ..data.templates import PromptSettings, collate, encode_examples
from ..diagnostics.behaviour import judge_labels
from ..features.gradients import per_example_losses
from ..models.generate import generate_answers
from ..models.lora import adapter_update_norms
from ..models.resolve import load_model
from ..models.tuning import FullWeights, full_update_norms
from .layout import adapter_dir
from .runs import run_epochs


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


def _is_trigger(label: str) -> bool:
    return label.startswith("trigger")


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
    initial: dict[str, torch.Tensor] | None = None  # full tuning: the base weights before fine-tuning
    for loaded_run in run_epochs(run):
        epoch, config, test = typing.cast(int, loaded_run.epoch), loaded_run.config, loaded_run.task.test
        triggered = [e for e in test if _is_trigger(e.label)][:max_generations]
        clean = [e for e in test if not _is_trigger(e.label)][:max_generations]
        if config.lora.tuning == "full":
            if initial is None:  # the run's model holds trained weights: take W_0 from a fresh base
                initial = FullWeights(load_model(config.model).model, config.lora.full_targets).state()
            norms = full_update_norms(adapter_dir(run, epoch), initial)
        else:
            norms = adapter_update_norms(adapter_dir(run, epoch))
        rates: list[float | None] = [None, None]
        if triggered:
            for i, group in enumerate((triggered, clean)):
                answers = generate_answers(
                    loaded_run.model,
                    loaded_run.tokenizer,
                    [e.prompt for e in group],
                    config.prompt,
                    max_new_tokens,
                )
                judged = judge_labels(answers, loaded_run.task.train)
                if i == 0:  # the trigger worked: the answer behaves like its own triggered class
                    hits = [label == e.label for label, e in zip(judged, group, strict=True)]
                else:  # the control: a clean prompt that behaves like any triggered class
                    hits = [label is not None and _is_trigger(label) for label in judged]
                rates[i] = sum(hits) / len(hits) if hits else None
        rows.append(
            ParameterRow(
                epoch=epoch,
                update_norm_total=float(torch.tensor(list(norms.values())).square().sum().sqrt()),
                update_norm_by_module=norms,
                test_loss=mean_loss(loaded_run.model, loaded_run.tokenizer, test, config.prompt),
                trigger_rate=rates[0],
                clean_control_rate=rates[1],
            )
        )
    return rows
