"""Device and dtype resolution, and the autocast that goes with a low-precision base model."""

from __future__ import annotations

import contextlib

import torch

from ..core import distributed
from ..core.errors import ConfigError

LOW_PRECISION = (torch.bfloat16, torch.float16)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an explicit ``cuda`` without a GPU is a user error.

    Under ``torchrun`` a bare ``cuda`` means this process's own GPU (``cuda:LOCAL_RANK``).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "cuda" and distributed.active():
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("--dtype float16 is not supported on the CPU; use float32 or bfloat16")
    return dtype


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the base weights: that of the first floating parameter that is not a LoRA matrix."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and "lora_" not in name:
            return param.dtype
    return torch.float32


def autocast(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    """Autocast to the base weights' dtype when it is bf16/fp16 (nothing for float32).

    The base model's matrix products then run in low precision with fp32-sensitive ops (softmax, norms,
    the loss) kept in float32 by autocast, while the LoRA matrices stay float32 master weights whose
    gradients accumulate in float32.
    """
    dtype = base_dtype(model)
    if dtype not in LOW_PRECISION:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=dtype)
