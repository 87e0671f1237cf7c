"""Collect per-example LoRA gradients inside a user's own training script, from its training passes.

Two ways in, one capture file out (:mod:`~..features.captured`), which ``llm-attr run --adapter ADAPTER
--captured FOLDER`` (and the Python API) read instead of collecting the training gradients again:

- :class:`GradientCaptureCallback`, a ``transformers.TrainerCallback`` (``Trainer``, TRL's ``SFTTrainer``):
  captures the passes of the last epoch (default) or of chosen optimizer steps, and writes the file when
  training ends;
- :func:`capture_gradients`, a context manager for any plain torch loop: every training pass inside the
  ``with`` block is captured, and the file is written when the block exits without an error.

A captured row is the gradient of that example's own mean token loss (what a post-hoc collection gives)
at the adapter state of the step that trained on it; with LoRA dropout on, it is the gradient of the
dropped-out pass the optimizer used. Equal to a post-hoc collection where the states are the same (tested:
a capture at learning rate 0 and dropout 0 scores exactly as a collection after training).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..features.capture import GradientHooks
from ..features.captured import write_capture
from ..features.gradients import GradientSettings
from ..models.tuning import lora_modules

log = logging.getLogger(__name__)


def _hooks(
    model: torch.nn.Module, settings: GradientSettings, step: Callable[[], int] | None = None
) -> GradientHooks:
    modules = lora_modules(model)
    for module in modules.values():
        if not module.weight.requires_grad:
            raise ValueError(
                "gradient capture: the model's LoRA weights are frozen; capture a model in training"
            )
    return GradientHooks(model, modules, settings.projector(), step)


def _about(hooks: GradientHooks, how: str) -> dict[str, Any]:
    steps = sorted(set(hooks.rows.steps.values()))
    return {
        "how": how,
        "examples": len(hooks.rows),
        "batches": hooks.batches_kept,
        "steps": [steps[0], steps[-1]] if steps else [],
    }


@contextlib.contextmanager
def capture_gradients(
    model: torch.nn.Module, out: str | Path, settings: GradientSettings | None = None
) -> Iterator[GradientHooks]:
    """Capture every training pass of ``model`` (a peft LoRA model) made inside the block into ``out``.

    The loop must call ``model(input_ids=..., attention_mask=..., labels=...)`` and ``backward()`` on a
    cross-entropy loss; each row records the ordinal of the batch it came from."""
    settings = GradientSettings() if settings is None else settings
    hooks = _hooks(model, settings)
    hooks.active = True
    try:
        yield hooks
    finally:
        hooks.remove()
    write_capture(Path(out), hooks.rows, settings.fingerprint(), _about(hooks, "capture_gradients"))


class GradientCaptureCallback(TrainerCallback):  # type: ignore[misc]
    """A ``TrainerCallback`` that captures the per-example LoRA gradients of the last epoch (``epochs``:
    which epochs, counted from 1; default the last) or of the optimizer steps in ``steps`` (counted from 1),
    and writes them to ``out`` when training ends."""

    def __init__(
        self,
        out: str | Path,
        settings: GradientSettings | None = None,
        epochs: tuple[int, ...] | None = None,
        steps: tuple[int, ...] | None = None,
    ) -> None:
        if epochs is not None and steps is not None:
            raise ValueError("GradientCaptureCallback: give epochs or steps, not both")
        self.out = Path(out)
        self.settings = GradientSettings() if settings is None else settings
        self.epochs = epochs
        self.steps = steps
        self.hooks: GradientHooks | None = None
        self._step = 0

    def _wanted(self, args: TrainingArguments, state: TrainerState) -> bool:
        if self.steps is not None:
            return state.global_step + 1 in self.steps  # the step about to run
        epoch = int(state.epoch or 0) + 1  # the epoch under way, from 1
        if self.epochs is not None:
            return epoch in self.epochs
        # the Trainer's own count (it derives one from max_steps too); a fractional last epoch counts
        last = math.ceil(getattr(state, "num_train_epochs", 0) or args.num_train_epochs)
        return epoch == last

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        self.hooks = _hooks(model, self.settings, lambda: self._step)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        assert self.hooks is not None
        self._step = state.global_step + 1
        self.hooks.active = self._wanted(args, state)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        assert self.hooks is not None
        self.hooks.active = False  # evaluation and logging between steps are not training passes

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        assert self.hooks is not None
        self.hooks.remove()
        about = _about(self.hooks, "GradientCaptureCallback")
        path = write_capture(self.out, self.hooks.rows, self.settings.fingerprint(), about)
        log.info("captured the gradients of %d examples into %s", len(self.hooks.rows), path)
