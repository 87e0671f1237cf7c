"""LoRA fine-tuning: a plain, seeded training loop that saves a peft adapter after every epoch.

A hand-written loop rather than the Hugging Face Trainer, because attribution needs to know exactly
what happened: which examples were in which step, in what order, with which learning rate. Same seed
and settings give bit-identical adapters on the CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from .. import distributed
from ..data.schema import Example
from ..data.templates import Encoded, PromptSettings, collate, encode_examples
from ..errors import UserError
from ..progress import ProgressBar
from ..run_layout import ADAPTER_WEIGHTS, TRAIN_STATE_FILE, adapter_dir
from ..settings import option, require, require_positive
from ..storage import atomic_dir, write_bytes_atomic
from .data_parallel import DataParallelSteps
from .device import autocast
from .lora import lora_parameters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation. The study used 10 epochs (50 on harmful-data tasks), batch 24, lr 5e-5 on 7B models;
    the defaults here suit small models on a CPU."""

    epochs: int = option(3, "passes over the training set; an adapter is saved after each")
    batch_size: int = option(8, "examples per optimisation step")
    learning_rate: float = option(3e-4, "peak AdamW learning rate, decayed linearly to 0")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = option(0, "seed of the LoRA initialisation, dropout and the shuffling order")

    def __post_init__(self) -> None:
        require_positive("epochs", self.epochs)
        require_positive("batch_size", self.batch_size)
        require_positive("learning_rate", self.learning_rate)
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        require(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm!r}")


@dataclass
class LossCurve:
    """Training loss per optimisation step and its mean per epoch."""

    steps: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    seconds_per_epoch: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "step_loss": self.steps,
            "epoch_loss": self.epochs,
            "seconds_per_epoch": self.seconds_per_epoch,
        }


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def finetune(
    model: PeftModel,
    tokenizer: object,
    train: Sequence[Example],
    prompt: PromptSettings,
    settings: TrainSettings,
    run: Path,
) -> LossCurve:
    """Train the LoRA weights of ``model`` on ``train``; save ``adapters/epoch-K`` after each epoch.

    The LoRA initialisation must already be seeded by the caller. After every epoch the optimizer,
    schedule, shuffling and dropout random states are saved too (``train_state.pt``), so that a run killed
    mid-way resumes from its last finished epoch (:func:`resume_state`) and ends with the adapter an
    uninterrupted run would have produced. Under ``torchrun`` each rank trains on a slice of every batch
    (:mod:`.data_parallel`) and rank 0 saves.
    """
    encoded: list[Encoded] = encode_examples(train, tokenizer, prompt)  # type: ignore[arg-type]
    pad_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    params = list(lora_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    generator = torch.Generator().manual_seed(settings.seed)
    curve, first = LossCurve(), 1
    state = resume_state(run)
    if state is not None:
        set_peft_model_state_dict(model, load_file(str(adapter_dir(run, state["epoch"]) / ADAPTER_WEIGHTS)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        curve = LossCurve(
            list(state["step_loss"]), list(state["epoch_loss"]), list(state["seconds_per_epoch"])
        )
        first = state["epoch"] + 1
        log.info("resuming fine-tuning after epoch %d", state["epoch"])
    model.train()
    parallel = DataParallelSteps(model, params, pad_id) if distributed.active() else None

    def backward(rows: list[int]) -> torch.Tensor:
        """The batch's mean token loss, its gradient left in the LoRA parameters' ``.grad``."""
        if parallel is not None:
            return parallel.backward([encoded[i] for i in rows])
        optimizer.zero_grad(set_to_none=True)
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in rows], pad_id).items()}
        with autocast(model):
            loss = model(**batch).loss
        loss.backward()
        return loss

    with ProgressBar(total, "fine-tuning") as bar, parallel or contextlib.nullcontext():
        bar.update((first - 1) * steps_per_epoch)
        for epoch in range(first, settings.epochs + 1):
            start, losses = time.perf_counter(), []
            for rows in _batches(len(encoded), settings.batch_size, generator):
                loss = backward(rows)
                if not torch.isfinite(loss):  # the same loss on every rank: all stop here together
                    ids = ", ".join(train[i].id for i in rows[:5])
                    raise UserError(
                        f"non-finite training loss in epoch {epoch} on examples {ids}; lower --learning-rate"
                    )
                if settings.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1, epoch=epoch, loss=f"{losses[-1]:.3f}")
            curve.steps.extend(losses)
            curve.epochs.append(sum(losses) / len(losses))
            curve.seconds_per_epoch.append(time.perf_counter() - start)
            with distributed.agree():
                if distributed.is_main():
                    with atomic_dir(adapter_dir(run, epoch)) as tmp:
                        model.save_pretrained(str(tmp))
                    _save_state(run, epoch, optimizer, scheduler, generator, curve)
            log.info(
                "epoch %d: mean loss %.4f (%.1f s)", epoch, curve.epochs[-1], curve.seconds_per_epoch[-1]
            )
    model.eval()
    return curve


def _save_state(
    run: Path,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    curve: LossCurve,
) -> None:
    # Written after the epoch's adapter: a state file always refers to an adapter that exists.
    buffer = io.BytesIO()
    torch.save(
        {
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step_loss": curve.steps,
            "epoch_loss": curve.epochs,
            "seconds_per_epoch": curve.seconds_per_epoch,
        },
        buffer,
    )
    write_bytes_atomic(run / TRAIN_STATE_FILE, buffer.getvalue())


def resume_state(run: Path) -> dict[str, Any] | None:
    """The saved training state of an unfinished run (None when there is none to resume from)."""
    path = run / TRAIN_STATE_FILE
    if not path.is_file():
        return None
    try:
        state: dict[str, Any] = torch.load(path, weights_only=True)
    except Exception as exc:  # a damaged state file: say so and train from the start
        log.warning("cannot read %s (%s); fine-tuning starts from the beginning", path, exc)
        return None
    if not (adapter_dir(run, state["epoch"]) / ADAPTER_WEIGHTS).is_file():
        return None
    return state
