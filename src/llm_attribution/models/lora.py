"""Attach a fresh LoRA adapter to a base model, or load a saved one (ours or any peft adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import PreTrainedModel

from ..core.errors import ConfigError, ModelError
from ..core.storage import file_sha256
from .settings import LoraSettings

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the file peft saves an adapter's weights in


def attach_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with new LoRA weights (A random, B zero, as peft initialises them), in float32."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.lora_targets if t not in present]
    if missing:
        raise ModelError(
            f"--lora-targets: the model has no module named {', '.join(missing)} "
            f"(linear layers it has include: {', '.join(sorted(_linear_names(model))[:12])})"
        )
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    _lora_to_float32(peft_model)
    return peft_model


def load_adapter(model: PreTrainedModel, adapter: Path, trainable: bool = False) -> PeftModel:
    """Load a saved peft adapter onto ``model`` (the base is always loaded by us, never from the adapter)."""
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    except Exception as exc:
        raise ModelError(f"cannot load adapter {adapter}: {str(exc).splitlines()[0]}") from None
    _lora_to_float32(peft_model)
    return peft_model


def _lora_to_float32(model: PeftModel) -> None:
    # Base weights may be bf16 on a GPU; the adapter and its gradients stay float32 for attribution.
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.float32)


def _linear_names(model: PreTrainedModel) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def lora_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA matrices by name (``...q_proj.lora_A.default.weight``), in module order."""
    return {name: p for name, p in model.named_parameters() if "lora_" in name and p.requires_grad}


def adapter_fingerprint(adapter: Path) -> str:
    """SHA-256 of the adapter's weights file: features depend on the exact weights."""
    for name in (ADAPTER_WEIGHTS, "adapter_model.bin"):
        if (adapter / name).is_file():
            return file_sha256(adapter / name)
    raise ConfigError(f"{adapter} holds no adapter weights (adapter_model.safetensors)")


def adapter_update_norms(adapter: Path) -> dict[str, float]:
    """``||(alpha / r) B A||_F`` per adapted module of a saved peft adapter (no model needed)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = float(config["lora_alpha"]) / float(config["r"])
    weights = load_file(str(adapter / ADAPTER_WEIGHTS))
    norms = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.").removeprefix("model.")
        norms[module] = float(torch.linalg.matrix_norm(scaling * (b.double() @ a.double())))
    return norms
