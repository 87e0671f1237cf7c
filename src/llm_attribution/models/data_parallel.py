"""Data-parallel fine-tuning under ``torchrun``: every rank takes a contiguous slice of each batch, and the
LoRA gradients are summed over ranks before the (identical, replicated) optimiser step.

A step equals the one-process step on the same global batch, up to floating-point summation order:

- The loss is the global batch's mean over its labelled tokens. Each rank sums its own tokens' losses and
  divides by the GLOBAL token count (known to every rank, which holds the whole batch's encoding), so the
  sum of the ranks' gradients is the one-process gradient; averaging per-rank means (what a plain DDP
  wrapper does) would weight examples by their rank's token count instead.
- LoRA dropout: every rank draws the mask of the WHOLE batch from the same seeded random stream, as the
  single process does, and keeps its own rows; each rank's slice is padded to the global batch's width so
  the mask shapes match. A rank whose slice is empty (batch smaller than the number of ranks) still runs a
  forward pass, without gradient, to keep its random stream in step.
- LoRA weights start equal (broadcast from rank 0) and every rank applies the same summed gradient.

What differs: each rank sums its tokens' gradient contributions and the ranks' sums are then added, a
different order of float additions than one process's (agreement to ~1e-6 relative, not bit identity).
A flat all-reduce of the LoRA gradients replaces the ``DistributedDataParallel`` wrapper: the adapter's
gradient is a few MB even for 7B models, so overlapping it with the backward pass gains nothing, and the
peft model keeps its own methods (``save_pretrained``) without a ``.module`` indirection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ..core import distributed
from ..data.templates import IGNORE_INDEX, Encoded, collate
from .device import autocast


class GlobalBatchDropout(torch.nn.Module):
    """Dropout that draws the mask of the whole global batch and applies the rows of this rank's slice."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.batch_rows = 0
        self.rows = slice(0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # dropout of ones is the scaled mask itself, drawn exactly as the one-process call on the full batch
        ones = torch.ones((self.batch_rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return x * torch.nn.functional.dropout(ones, self.p, training=True)[self.rows]


def labelled_tokens(example: Encoded) -> int:
    """Tokens whose next-token prediction the loss counts (a label follows them)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled tokens (the loss of HF causal LMs, unnormalised)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class DataParallelSteps:
    """Forward and backward of each step's slice, gradients summed over ranks (use as a context manager:
    it swaps the LoRA dropout modules for :class:`GlobalBatchDropout` and puts them back)."""

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter], pad_id: int) -> None:
        self.model, self.params, self.pad_id = model, list(params), pad_id
        self.device = self.params[0].device
        self._swapped: list[tuple[torch.nn.ModuleDict, str, torch.nn.Module]] = []
        self.dropouts: list[GlobalBatchDropout] = []
        with torch.no_grad():
            flat = distributed.broadcast_(torch.cat([p.detach().flatten() for p in self.params]))
            self._unflatten(flat, grads=False)

    def __enter__(self) -> DataParallelSteps:
        for module in self.model.modules():
            holder = getattr(module, "lora_dropout", None)
            if not isinstance(holder, torch.nn.ModuleDict):
                continue
            for key, dropout in holder.items():
                if isinstance(dropout, torch.nn.Dropout):
                    replacement = GlobalBatchDropout(dropout.p)
                    replacement.train(dropout.training)
                    holder[key] = replacement
                    self._swapped.append((holder, key, dropout))
                    self.dropouts.append(replacement)
        return self

    def __exit__(self, *exc: object) -> None:
        for holder, key, dropout in self._swapped:
            dropout.train(holder[key].training)
            holder[key] = dropout
        self._swapped.clear()
        self.dropouts.clear()

    def backward(self, batch: Sequence[Encoded]) -> torch.Tensor:
        """This rank's share of the batch's loss gradient in ``.grad``, summed over ranks; returns the
        global batch's mean token loss (a 0-d tensor, equal on every rank)."""
        rows = distributed.my_rows(len(batch))
        own = list(batch[rows])
        width = max(len(e.input_ids) for e in batch)
        total = max(1, sum(labelled_tokens(e) for e in batch))
        for dropout in self.dropouts:
            dropout.batch_rows, dropout.rows = len(batch), rows if own else slice(0, 1)
        for param in self.params:
            param.grad = None
        loss = torch.zeros((), device=self.device)
        with distributed.agree():
            inputs = {
                k: v.to(self.device)
                for k, v in collate(own or list(batch[:1]), self.pad_id, width=width).items()
            }
            labels = inputs.pop("labels")
            # an empty share still runs the forward pass (no gradient) to draw the same dropout masks
            with autocast(self.model), contextlib.nullcontext() if own else torch.no_grad():
                logits = self.model(**inputs).logits
            if own:
                loss = token_loss_sum(logits, labels) / total
                loss.backward()
        flat = torch.cat(
            [p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten() for p in self.params]
            + [loss.detach().float().reshape(1)]
        )
        distributed.all_reduce_sum(flat)
        self._unflatten(flat, grads=True)
        return flat[-1]

    def _unflatten(self, flat: torch.Tensor, grads: bool) -> None:
        offset = 0
        for param in self.params:
            part = flat[offset : offset + param.numel()].view_as(param)
            if grads:
                param.grad = part.to(param.dtype)
            else:
                param.copy_(part)
            offset += param.numel()
