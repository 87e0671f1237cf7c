"""Attach a fresh LoRA adapter to a base model, or load a saved one (ours or any peft adapter)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import PreTrainedModel

from ..core.errors import ConfigError, ModelError
from ..core.storage import file_sha256
from .settings import LoraSettings

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the file peft saves an adapter's weights in
SUPPORTED_ADAPTERS = (
    "peft LoRA adapters (any target modules and rank, rsLoRA, per-module rank and alpha patterns, "
    "modules_to_save, one of several adapters by name)"
)
# What an adapter config records about itself, kept in the run's settings (``adapter.config``).
RECORDED_CONFIG = (
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "modules_to_save"
)  # fmt: skip


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


def adapter_config(adapter: Path) -> dict[str, Any]:
    """The adapter's peft config, checked to be a LoRA adapter whose matrices are plain LoRA (besides
    whole modules it may save, :func:`untracked_modules`); ModelError in one line otherwise: what it is,
    and what is supported."""
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise ModelError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None
    kind = str(config.get("peft_type", "?"))
    if kind != "LORA":
        raise ModelError(f"{adapter} is a {kind} adapter; supported: {SUPPORTED_ADAPTERS}")
    if config.get("use_dora"):
        # DoRA also trains a magnitude vector per module, whose gradients no method here attributes.
        raise ModelError(f"{adapter} is a DoRA adapter (use_dora); supported: {SUPPORTED_ADAPTERS}")
    return config


def adapter_folder(adapter: Path, name: str | None = None) -> Path:
    """The folder of one adapter: ``adapter`` itself, or with ``name`` the adapter of that name that peft
    saved beside others (``save_pretrained`` of a model with several adapters writes each but the default
    one into a subfolder of its name). A folder of several and no name is refused, naming them."""
    if name is not None and name != "default":
        chosen = adapter / name
        if not (chosen / "adapter_config.json").is_file():
            found = _named_adapters(adapter)
            raise ModelError(
                f"{adapter} holds no adapter named {name!r} (it has: {', '.join(found) or 'none by name'})"
            )
        return chosen
    if not (adapter / "adapter_config.json").is_file():
        found = _named_adapters(adapter)
        if found:
            raise ModelError(
                f"{adapter} holds adapters by name ({', '.join(found)}): pick one with --adapter-name"
            )
    return adapter


def _named_adapters(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.parent.name for p in folder.glob("*/adapter_config.json"))


def untracked_modules(config: dict[str, Any]) -> list[str]:
    """Modules an adapter trains in whole besides its LoRA matrices (``modules_to_save``): loaded into the
    model, so the attributed model is the trained one, but their gradients are not attributed."""
    return list(config.get("modules_to_save") or [])


def recorded_config(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of an adapter config a run records beside the adapter's path and checksum."""
    kept = {key: config.get(key) for key in RECORDED_CONFIG}
    if not kept["modules_to_save"]:
        del kept["modules_to_save"]  # recorded only where set: runs of plain adapters keep their settings
    if isinstance(kept["target_modules"], list):
        kept["target_modules"] = sorted(kept["target_modules"])
    return kept


def load_adapter(model: PreTrainedModel, adapter: Path, trainable: bool = False) -> PeftModel:
    """Load a saved peft adapter onto ``model`` (the base is always loaded by us, never from the adapter)."""
    adapter_config(adapter)
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
    """``||s B A||_F`` per adapted module of a saved peft adapter (no model needed), with peft's scaling
    ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``), the module's own rank and alpha where the config's
    patterns give them."""
    config = adapter_config(adapter)
    weights = load_file(str(adapter / ADAPTER_WEIGHTS))
    norms = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.").removeprefix("model.")
        rank = a.shape[0]  # the module's own rank, whatever rank_pattern says
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        norms[module] = float(torch.linalg.matrix_norm(scaling * (b.double() @ a.double())))
    return norms


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """A per-module value from a peft pattern (a key matching the module name's end, as peft reads it)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default
