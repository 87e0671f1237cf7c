"""What fine-tuning trains, and how each epoch's trained weights are kept: LoRA matrices (a peft adapter)
or the full weights of the base model's linear layers (``--tuning full``).

Either way the trained weights are those of a set of ``torch.nn.Linear`` modules (LoRA's A and B matrices
are linear maps too), so fine-tuning, checkpointing, resuming and per-example gradient collection treat
both alike through :class:`TunedWeights`: the modules by block name, their weights as trainable
parameters, a state to resume from, and one file per epoch.

Full fine-tuning trains the whole ``weight`` of every linear module whose name is in ``full_targets``
(default: the attention projections q, k, v, o and the MLP projections gate, up, down of every decoder
layer). Embeddings, norms, biases and the output head (tied to the embeddings in Llama-style small models)
stay frozen, so every trained matrix is one whose per-example gradient ``sum_t delta_t u_t^T`` the gradient
hooks can form (projected) from its input and output alone.
"""

from __future__ import annotations

import abc
import json
import typing
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from ..core.errors import ModelError, UserError
from ..core.storage import file_sha256
from .lora import ADAPTER_WEIGHTS, adapter_fingerprint, lora_parameters
from .settings import LoraSettings

FULL_WEIGHTS = "full_weights.safetensors"  # one epoch's trained base weights (only those), by parameter name
FULL_CONFIG = "full_config.json"  # which modules they are: read back to check a checkpoint fits the model
FULL_UNPROJECTED_LIMIT = 4096
"""Numbers per example above which a full layer's gradient must be projected while collected: a LoRA
block of a small model is about this size, a full layer of the embedded model is 27 to 216 times it."""


def _short(parts: list[str]) -> str:
    while parts and parts[0] in ("base_model", "model"):
        parts = parts[1:]
    return ".".join(parts)


def block_name(module_name: str) -> str:
    """Short block name: ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default`` becomes
    ``layers.3.self_attn.q_proj.lora_A``; a base module ``model.layers.3.mlp.up_proj`` becomes
    ``layers.3.mlp.up_proj``."""
    parts = module_name.split(".")
    if len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B"):
        parts = parts[:-1]  # the adapter name, e.g. "default"
    return _short(parts)


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear maps of every LoRA matrix, by block name, in module order."""
    found: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        parent = name.rsplit(".", 2)
        if isinstance(module, torch.nn.Linear) and len(parent) == 3 and parent[1] in ("lora_A", "lora_B"):
            found[block_name(name)] = module
    if not found:
        raise UserError("the model has no LoRA adapter: attach or load one before collecting gradients")
    return found


class TunedWeights(abc.ABC):
    """The weights fine-tuning trains: a set of linear modules, checkpointed one file per epoch."""

    kind: str
    weights_file: str  # the file of an epoch's folder that holds its trained weights
    projection_required: bool  # per-example gradients must be projected beyond FULL_UNPROJECTED_LIMIT

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @abc.abstractmethod
    def modules(self) -> dict[str, torch.nn.Linear]:
        """The trained linear modules by block name, in module order."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (each module's weight), in module order."""
        return [typing.cast(torch.nn.Parameter, m.weight) for m in self.modules().values()]

    @abc.abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """The trained weights by name, for a resumable training state."""

    @abc.abstractmethod
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put weights from :meth:`state` (or an epoch's file) into the model, in place."""

    @abc.abstractmethod
    def save(self, folder: Path) -> None:
        """Write the epoch's checkpoint into ``folder`` (an empty folder that becomes the epoch's)."""

    def load(self, folder: Path) -> None:
        """Load an epoch's checkpoint into the model, in place."""
        self.load_state(load_file(str(folder / self.weights_file)))


class LoraWeights(TunedWeights):
    """The LoRA matrices of a peft model, saved as a peft adapter."""

    kind = "lora"
    weights_file = ADAPTER_WEIGHTS
    projection_required = False

    def modules(self) -> dict[str, torch.nn.Linear]:
        return lora_modules(self.model)  # type: ignore[arg-type]

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(lora_parameters(self.model).values())  # type: ignore[arg-type]

    def state(self) -> dict[str, torch.Tensor]:
        return dict(get_peft_model_state_dict(self.model))

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.model, state)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder))  # type: ignore[operator]


class FullWeights(TunedWeights):
    """The full weights of the base model's linear layers named in ``targets`` (float32, trainable; every
    other parameter frozen)."""

    kind = "full"
    weights_file = FULL_WEIGHTS
    projection_required = True

    def __init__(self, model: PreTrainedModel, targets: tuple[str, ...]) -> None:
        super().__init__(model)
        if isinstance(model, PeftModel):
            raise ModelError("--tuning full trains the base model's own weights: do not attach LoRA to it")
        self.targets = tuple(targets)
        chosen = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in self.targets
        }
        self._modules = {block_name(name): module for name, module in chosen.items()}
        self._weights = {f"{name}.weight": module for name, module in chosen.items()}  # parameter names
        present = {name.rsplit(".", 1)[-1] for name in chosen}
        missing = [t for t in self.targets if t not in present]
        if missing:
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            )
            raise ModelError(
                f"--full-targets: the model has no linear module named {', '.join(missing)} "
                f"(its linear layers: {', '.join(linear[:12])})"
            )
        for param in model.parameters():
            param.requires_grad_(False)
        for module in self._modules.values():
            # float32 master weights, as LoRA's: a bf16 base still trains and differentiates in float32
            module.weight.data = module.weight.data.to(torch.float32)
            module.weight.requires_grad_(True)

    def modules(self) -> dict[str, torch.nn.Linear]:
        return dict(self._modules)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: m.weight.detach().clone() for name, m in self._weights.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        named = self._weights
        if set(state) != set(named):
            raise ModelError(
                f"the saved full weights do not fit this model ({len(state)} matrices saved, {len(named)} "
                f"trained here, e.g. {sorted(set(state) ^ set(named))[:2]})"
            )
        with torch.no_grad():
            for name, module in named.items():
                module.weight.copy_(state[name])

    def save(self, folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state().items()}, str(folder / FULL_WEIGHTS))
        config = {"tuning": "full", "targets": list(self.targets)}
        (folder / FULL_CONFIG).write_text(json.dumps(config) + "\n")


def tuned_weights(model: torch.nn.Module, settings: LoraSettings) -> TunedWeights:
    """The weights ``settings`` train on ``model``: a peft model's LoRA matrices, or (``--tuning full``) the
    target linear layers' full weights, which this unfreezes (and every other parameter freezes)."""
    if settings.tuning == "full":
        return FullWeights(model, settings.full_targets)  # type: ignore[arg-type]
    if not isinstance(model, PeftModel):
        raise ModelError("LoRA tuning needs a peft model: attach or load an adapter first")
    return LoraWeights(model)


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a complete epoch checkpoint of either kind."""
    return (folder / "adapter_config.json").is_file() or (folder / FULL_WEIGHTS).is_file()


def checkpoint_fingerprint(folder: Path) -> str:
    """SHA-256 of an epoch's trained-weights file (full weights or a peft adapter): features depend on the
    exact weights."""
    if (folder / FULL_WEIGHTS).is_file():
        return file_sha256(folder / FULL_WEIGHTS)
    return adapter_fingerprint(folder)


def full_update_norms(folder: Path, initial: dict[str, torch.Tensor]) -> dict[str, float]:
    """``||W_epoch - W_0||_F`` per trained module of a full checkpoint, against the base weights
    ``initial`` (parameter name -> the weight before fine-tuning)."""
    weights = load_file(str(folder / FULL_WEIGHTS))
    return {
        _short(key.removesuffix(".weight").split(".")): float(
            torch.linalg.matrix_norm(w.double() - initial[key].double())
        )
        for key, w in weights.items()
    }
