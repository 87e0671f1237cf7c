"""Fine-tune the same initial weights again on another set of training examples.

Ground truth is counterfactual (retrain without some examples: what changes?), so a retrained model must
differ from the original only in its data: the same base, the same initial trained weights (LoRA's random
A and zero B, or with ``--tuning full`` the base's own linear weights), the same seed for shuffling and
dropout, the same optimiser settings. A :class:`Retrainer` keeps the initial weights and the random state
right after they were drawn, and restores both before every fine-tune; retrained on the full training set
it reproduces the run's own trained weights bit for bit (tested for LoRA and full fine-tuning).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.schema import Example
from ..data.templates import PromptSettings
from .finetune import Checkpoints, LossCurve, TrainSettings, finetune
from .lora import attach_lora
from .settings import LoraSettings
from .tuning import TunedWeights, tuned_weights


class Retrainer:
    """One base model with trained weights initialised as a run with ``seed`` initialises them: a LoRA
    adapter, or (``settings.tuning == "full"``) the target linear layers' own weights."""

    def __init__(
        self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lora: LoraSettings, seed: int
    ) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        torch.manual_seed(seed)  # what a run does right before attaching its adapter
        # A copy: peft injects the adapter into the model it wraps, full tuning unfreezes the copy's
        # weights, and either way the caller's base stays untouched.
        copied = copy.deepcopy(base)
        self.model: PeftModel | PreTrainedModel = (
            copied if lora.tuning == "full" else attach_lora(copied, lora)
        )
        self.weights: TunedWeights = tuned_weights(self.model, lora)
        # Clones: a peft state dict shares storage with the live parameters, which training overwrites.
        self._initial = {k: v.detach().clone() for k, v in self.weights.state().items()}
        self._rng = torch.get_rng_state()
        device = next(self.model.parameters()).device
        self._cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> PeftModel | PreTrainedModel:
        """The model at the initial weights, with the random state(s) the run's fine-tuning started from."""
        self.weights.load_state(self._initial)
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
        """Fine-tune the initial weights on ``examples`` (in this process alone, even under torchrun).

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
            self.model,
            self.tokenizer,
            examples,
            prompt,
            settings,
            checkpoints,
            across_ranks=False,
            weights=self.weights,
        )
        shutil.rmtree(workdir, ignore_errors=True)
        return curve
