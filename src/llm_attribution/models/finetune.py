"""Fine-tuning: a plain, seeded training loop that saves the trained weights after every epoch (a peft
adapter for LoRA, the trained matrices' safetensors for full fine-tuning; see :mod:`.tuning`).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core import distributed
from ..core.errors import UserError
from ..core.pause import pause_point
from ..core.progress import ProgressBar
from ..core.settings import option, require, require_positive
from ..core.storage import atomic_dir, write_bytes_atomic
from ..data.schema import Example
from ..data.templates import Encoded, PromptSettings, collate, encode_examples
from .data_parallel import DataParallelSteps
from .device import autocast
from .lora import ADAPTER_WEIGHTS
from .moments import save_moments
from .tuning import LoraWeights, TunedWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoints:
    """Where fine-tuning keeps what it resumes from: the weights saved after each epoch and the training
    state. The workflow that owns the run folder chooses the paths (``workflows/layout.py``)."""

    adapter: Callable[[int], Path]  # epoch -> the folder of the adapter (or full weights) saved after it
    state: Path  # optimizer, schedule, random states and trained weights of the last saved step


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
    adam_epsilon: float = option(
        1e-8, "AdamW's epsilon (added to the root of the second moment)", recorded_at_default=False
    )
    checkpoint_minutes: float = option(
        5.0,
        "save the training state mid-epoch at most this often, for resuming a killed run (0: after every "
        "step); results do not depend on it",
        recorded=False,
    )

    def __post_init__(self) -> None:
        require_positive("epochs", self.epochs)
        require_positive("batch_size", self.batch_size)
        require_positive("learning_rate", self.learning_rate)
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        require(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm!r}")
        require(self.adam_epsilon > 0, f"--adam-epsilon must be > 0, got {self.adam_epsilon!r}")
        require(
            math.isfinite(self.checkpoint_minutes) and self.checkpoint_minutes >= 0,
            f"--checkpoint-minutes must be >= 0, got {self.checkpoint_minutes!r}",
        )


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


def decay(step: int, total: int) -> float:
    """The schedule's factor on the peak learning rate for optimisation step ``step`` (0-based): linear
    decay to 0 over ``total`` steps."""
    return max(0.0, 1.0 - step / total)


def epoch_learning_rates(settings: TrainSettings, n_train: int) -> dict[int, float]:
    """Per epoch (1-based), the mean learning rate of the optimisation steps that epoch took: the weight
    TracIn gives the checkpoint saved after it (the learning rate *at* each checkpoint would weigh the
    last one 0 under a decay to 0)."""
    steps = math.ceil(n_train / settings.batch_size)
    total = steps * settings.epochs
    return {
        epoch: settings.learning_rate
        * sum(decay(s, total) for s in range((epoch - 1) * steps, epoch * steps))
        / steps
        for epoch in range(1, settings.epochs + 1)
    }


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's batches (training rows), drawn from ``generator``: the order replays depend on."""
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def finetune(
    model: torch.nn.Module,
    tokenizer: object,
    train: Sequence[Example],
    prompt: PromptSettings,
    settings: TrainSettings,
    checkpoints: Checkpoints,
    across_ranks: bool = True,
    *,
    weights: TunedWeights | None = None,
) -> LossCurve:
    """Train ``weights`` (default: the LoRA matrices of the peft ``model``) on ``train``; save them after
    each epoch.

    The LoRA initialisation must already be seeded by the caller. The training state (LoRA weights,
    optimizer, schedule, shuffling and dropout random states) is saved to ``checkpoints.state`` after every
    epoch and, mid-epoch, at most every ``settings.checkpoint_minutes``; a run killed at any point resumes
    from its last saved step (:func:`resume_state`) and ends with the adapters an uninterrupted run saves.
    Under ``torchrun`` each rank trains on a slice of every batch (:mod:`.data_parallel`) and rank 0 saves;
    ``across_ranks=False`` trains in this process alone (each rank its own model, as LDS retraining does).
    """
    shared = across_ranks and distributed.active()
    encoded: list[Encoded] = encode_examples(train, tokenizer, prompt)  # type: ignore[arg-type]
    pad_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    weights = LoraWeights(model) if weights is None else weights
    params = weights.parameters()
    optimizer = torch.optim.AdamW(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay, eps=settings.adam_epsilon
    )
    steps_per_epoch = math.ceil(len(encoded) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: decay(step, total))
    generator = torch.Generator().manual_seed(settings.seed)
    curve, first, done, partial, partial_seconds = LossCurve(), 1, 0, [], 0.0
    state = resume_state(checkpoints, weights.weights_file)
    if state is not None:
        trained = state.get("weights", state.get("lora"))  # "lora": state files of LoRA-only versions
        if trained is None:  # a state file written before the trained weights were kept in it
            weights.load(checkpoints.adapter(state["epoch"]))
        else:
            weights.load_state(trained)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        _set_rng_states(state, device)
        curve = LossCurve(
            list(state["step_loss"]), list(state["epoch_loss"]), list(state["seconds_per_epoch"])
        )
        first, done = state["epoch"] + 1, state.get("step", 0)
        partial, partial_seconds = list(state.get("epoch_step_loss", [])), state.get("epoch_seconds", 0.0)
        log.info("resuming fine-tuning in epoch %d after step %d", first, done)
    model.train()
    every = settings.checkpoint_minutes * 60.0
    last_save = time.monotonic()
    parallel = DataParallelSteps(model, params, pad_id) if shared else None

    def backward(rows: list[int]) -> torch.Tensor:
        """The batch's mean token loss, its gradient left in the trained parameters' ``.grad``."""
        if parallel is not None:
            loss = parallel.backward([encoded[i] for i in rows])
            if not torch.isfinite(loss):  # the same loss on every rank: all stop here together
                ids = ", ".join(train[i].id for i in rows[:5])
                raise UserError(
                    f"non-finite training loss in epoch {epoch} in the batch of example(s) {ids}; "
                    "lower --learning-rate, or check those examples and the model's weights"
                )
            return loss
        optimizer.zero_grad(set_to_none=True)
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in rows], pad_id).items()}
        with autocast(model):
            out = model(**batch)
        if not torch.isfinite(out.loss):
            ids = ", ".join(train[rows[r]].id for r in _non_finite_rows(out.logits, batch)[:5])
            raise UserError(
                f"non-finite training loss in epoch {epoch} on example(s) {ids}; "
                "lower --learning-rate, or check those examples and the model's weights"
            )
        out.loss.backward()
        return out.loss

    with ProgressBar(total, "fine-tuning") as bar, parallel or contextlib.nullcontext():
        bar.update((first - 1) * steps_per_epoch + done)
        for epoch in range(first, settings.epochs + 1):
            at_start = generator.get_state()  # redraws this epoch's order when resuming mid-epoch
            batches = batch_order(len(encoded), settings.batch_size, generator)
            skip = done if epoch == first else 0
            losses = partial if skip else []
            start = time.perf_counter() - (partial_seconds if skip else 0.0)
            for step in range(skip, len(batches)):
                rows = batches[step]
                loss = backward(rows)
                if settings.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                try:
                    optimizer.step()
                except RuntimeError as exc:  # AdamW's step size itself overflows float32
                    if "overflow" not in str(exc):
                        raise
                    raise UserError(
                        f"the optimizer step overflowed in epoch {epoch}: --learning-rate "
                        f"{settings.learning_rate:g} is far too large"
                    ) from None
                scheduler.step()
                losses.append(loss.item())
                bar.update(1, epoch=epoch, loss=f"{losses[-1]:.3f}")
                pause_point("finetune-step")
                due = step + 1 < len(batches) and time.monotonic() - last_save >= every
                if shared:  # clocks differ between ranks: rank 0 decides for all
                    due = bool(distributed.broadcast_object(due))
                if due:
                    if distributed.is_main() or not shared:
                        elapsed = time.perf_counter() - start
                        mid = _state(
                            weights, optimizer, scheduler, curve, device, epoch - 1, step + 1, at_start
                        )
                        _save_state(
                            checkpoints.state,
                            mid | {"epoch_step_loss": list(losses), "epoch_seconds": elapsed},
                        )
                    last_save = time.monotonic()
            curve.steps.extend(losses)
            curve.epochs.append(sum(losses) / len(losses))
            curve.seconds_per_epoch.append(time.perf_counter() - start)
            with distributed.agree() if shared else contextlib.nullcontext():
                if distributed.is_main() or not shared:
                    with atomic_dir(checkpoints.adapter(epoch)) as tmp:
                        weights.save(tmp)
                        save_moments(optimizer, weights, tmp)  # LESS and TrackStar precondition with them
                    # Written after the epoch's adapter: a state file always refers to adapters that exist.
                    _save_state(
                        checkpoints.state,
                        _state(weights, optimizer, scheduler, curve, device, epoch, 0, generator.get_state()),
                    )
            last_save = time.monotonic()
            log.info(
                "epoch %d: mean loss %.4f (%.1f s)", epoch, curve.epochs[-1], curve.seconds_per_epoch[-1]
            )
    model.eval()
    return curve


def _non_finite_rows(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[int]:
    """Rows of a batch whose logits are non-finite at a real token (all rows when none is singled out)."""
    finite = torch.isfinite(logits.detach()).all(dim=-1) | (batch["attention_mask"] == 0)
    bad = torch.nonzero(~finite.all(dim=1)).flatten().tolist()
    return bad or list(range(logits.shape[0]))


def _state(
    weights: TunedWeights,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    curve: LossCurve,
    device: torch.device,
    epoch: int,
    step: int,
    generator: torch.Tensor,
) -> dict[str, Any]:
    """Everything the next step depends on: after ``epoch`` finished epochs and ``step`` steps of the next.

    ``generator`` is the shuffling generator's state at the start of epoch ``epoch + 1`` (its order is
    redrawn on resuming); a mid-epoch state adds that epoch's losses and seconds so far.
    """
    return {
        "epoch": epoch,
        "step": step,
        "weights": weights.state(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "step_loss": list(curve.steps),
        "epoch_loss": list(curve.epochs),
        "seconds_per_epoch": list(curve.seconds_per_epoch),
        "epoch_step_loss": [],
        "epoch_seconds": 0.0,
    }


def _set_rng_states(state: dict[str, Any], device: torch.device) -> None:
    """Restore the dropout random state(s) a saved state was taken with."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def resume_state(checkpoints: Checkpoints, weights_file: str = ADAPTER_WEIGHTS) -> dict[str, Any] | None:
    """The saved training state of an unfinished run (None when there is none to resume from);
    ``weights_file``: the file an epoch's checkpoint keeps its trained weights in."""
    path = checkpoints.state
    if not path.is_file():
        return None
    try:
        state: dict[str, Any] = torch.load(path, weights_only=True)
    except Exception as exc:  # a damaged state file: say so and train from the start
        log.warning("cannot read %s (%s); fine-tuning starts from the beginning", path, exc)
        return None
    if state["epoch"] > 0 and not (checkpoints.adapter(state["epoch"]) / weights_file).is_file():
        return None
    return state
