"""AdamW's moment estimates at each saved epoch, kept beside the epoch's trained weights.

LESS preconditions a training gradient with the Adam update it would make from the optimizer's state at
a checkpoint, and TrackStar divides gradients by the square root of the second moment: both need the
moments of every trained matrix as they were when the epoch's checkpoint was saved. They are stored
flattened row-major, like the per-example gradient rows of the same block (``o x i``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .tuning import TunedWeights

MOMENTS_FILE = "optimizer_moments.safetensors"


@dataclass(frozen=True)
class OptimizerMoments:
    """Per block: AdamW's first and second moment estimates (float32 ``[d]``) and its step count."""

    first: dict[str, torch.Tensor]
    second: dict[str, torch.Tensor]
    steps: dict[str, int]
    beta1: float
    beta2: float
    eps: float

    def renamed(self, rename: dict[str, str]) -> OptimizerMoments:
        """The same moments under other block names (``old -> new``; blocks not named are dropped)."""
        return OptimizerMoments(
            {rename[b]: t for b, t in self.first.items() if b in rename},
            {rename[b]: t for b, t in self.second.items() if b in rename},
            {rename[b]: s for b, s in self.steps.items() if b in rename},
            self.beta1,
            self.beta2,
            self.eps,
        )

    def merged(self, other: OptimizerMoments) -> OptimizerMoments:
        """Both sets of blocks (the hyper-parameters must agree)."""
        if (self.beta1, self.beta2, self.eps) != (other.beta1, other.beta2, other.eps):
            raise ValueError("moments of optimizers with other betas or eps cannot be merged")
        return OptimizerMoments(
            {**self.first, **other.first},
            {**self.second, **other.second},
            {**self.steps, **other.steps},
            self.beta1,
            self.beta2,
            self.eps,
        )

    def corrected_second(self, block: str) -> torch.Tensor:
        """The bias-corrected second moment ``v / (1 - beta2^t)`` of one block."""
        return self.second[block] / (1.0 - self.beta2 ** max(self.steps[block], 1))


def save_moments(optimizer: torch.optim.Optimizer, weights: TunedWeights, folder: Path) -> None:
    """Write the optimizer's moments of every trained matrix into an epoch's checkpoint ``folder``."""
    group = optimizer.param_groups[0]
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, str] = {}
    for block, module in weights.modules().items():
        state = optimizer.state.get(module.weight, {})
        if "exp_avg" not in state:
            continue  # a matrix no step has updated yet
        tensors[f"{block}.exp_avg"] = state["exp_avg"].detach().float().flatten().contiguous().cpu()
        tensors[f"{block}.exp_avg_sq"] = state["exp_avg_sq"].detach().float().flatten().contiguous().cpu()
        steps[f"{block}.step"] = str(int(float(state["step"])))
    beta1, beta2 = group["betas"]
    metadata = {
        "beta1": str(float(beta1)),
        "beta2": str(float(beta2)),
        "eps": str(float(group["eps"])),
        **steps,
    }
    save_file(tensors, str(folder / MOMENTS_FILE), metadata=metadata)


def load_moments(folder: Path) -> OptimizerMoments | None:
    """The moments saved with an epoch's checkpoint, or None when it has none (trained by an older version
    or outside this tool)."""
    path = folder / MOMENTS_FILE
    if not path.is_file():
        return None
    first: dict[str, torch.Tensor] = {}
    second: dict[str, torch.Tensor] = {}
    steps: dict[str, int] = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            block, _, kind = key.rpartition(".")
            (first if kind == "exp_avg" else second)[block] = handle.get_tensor(key)
    for block in first:
        steps[block] = int(metadata[f"{block}.step"])
    return OptimizerMoments(
        first, second, steps, float(metadata["beta1"]), float(metadata["beta2"]), float(metadata["eps"])
    )
