"""Fine-tune the same initial LoRA adapter again on another set of training examples.

Ground truth is counterfactual (retrain without some examples: what changes?), so a retrained model must
differ from the original only in its data: the same base, the same LoRA initialisation, the same seed for
shuffling and dropout, the same optimiser settings. A :class:`Retrainer` keeps the initial adapter and the
random state right after it was drawn, and restores both before every fine-tune; retrained on the full
training set it reproduces the run's own adapter bit for bit (tested).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.schema import Example
from ..data.templates import PromptSettings
from .finetune import Checkpoints, LossCurve, TrainSettings, finetune
from .lora import attach_lora
from .settings import LoraSettings


class Retrainer:
    """One base model with a LoRA adapter initialised as a run with ``seed`` initialises it."""

    def __init__(
        self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lora: LoraSettings, seed: int
    ) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        torch.manual_seed(seed)  # what a run does right before attaching its adapter
        # A copy: peft injects the adapter into the model it wraps, and the caller's base stays untouched.
        self.model: PeftModel = attach_lora(copy.deepcopy(base), lora)
        self._initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        self._rng = torch.get_rng_state()
        device = next(self.model.parameters()).device
        self._cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> PeftModel:
        """The model at the initial adapter, with the random state(s) the run's fine-tuning started from."""
        set_peft_model_state_dict(self.model, self._initial)
        torch.set_rng_state(self._rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state(self._cuda_rng, next(self.model.parameters()).device)
        return self.model

    def train(
        self,
        examples: Sequence[Example],
        prompt: PromptSettings,
        settings: TrainSettings,
        workdir: Path,
    ) -> LossCurve:
        """Fine-tune the initial adapter on ``examples`` (in this process alone, even under torchrun).

        ``workdir`` keeps the training state while it runs, so a killed retrain resumes mid-way; it is
        removed when the retrain is done. ``settings.seed`` must be this retrainer's seed.
        """
        if settings.seed != self.seed:
            raise ValueError(f"a Retrainer for seed {self.seed} asked to train with seed {settings.seed}")
        self.restore()
        checkpoints = Checkpoints(
            adapter=lambda epoch: workdir / f"epoch-{epoch}", state=workdir / "state.pt"
        )
        curve = finetune(
            self.model, self.tokenizer, examples, prompt, settings, checkpoints, across_ranks=False
        )
        shutil.rmtree(workdir, ignore_errors=True)
        return curve
