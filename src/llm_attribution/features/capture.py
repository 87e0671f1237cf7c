"""Per-example gradients captured from a training loop's own passes, with no second pass.

Any loop that calls ``model(input_ids=..., attention_mask=..., labels=...)`` and then ``backward()`` on a
loss that is some multiple of the batch's token cross-entropy (a Hugging Face ``Trainer``, TRL's
``SFTTrainer``, gradient accumulation, ``num_items_in_batch``, a plain torch loop) already computes every
trained module's input ``u_t`` and, in the backward pass, its output gradient ``delta_t``. An example's
gradient of one trained matrix is ``sum_t delta_t u_t^T`` over its own tokens, so hooks on the modules form
it from what the pass computes anyway (projected on both sides when asked, as a post-hoc collection does).

What the pass differentiates is the *training* loss, ``alpha_i x (sum of example i's token losses)``, where
``alpha_i`` is whatever the loop divides by (the batch's token count, gradient accumulation steps, a
per-example mean). The attribution loss is each example's own mean token loss, so a captured row is divided
by ``alpha_i x n_i``. ``alpha_i`` is read off the gradient of the logits at the labelled tokens, which for
a cross-entropy loss is ``alpha_i (softmax - onehot(label))``: exact for every loop above, and checked, so
a loss that is not token cross-entropy (label smoothing, a custom loss) fails in one line instead of giving
wrong rows.

Rows are keyed by the example's content (its unpadded tokens and which of them carry a label), so the same
example trained twice keeps its latest row and a later reader finds each of its examples by what it is,
whatever order the loop shuffled them into.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import ConfigError
from ..data.templates import IGNORE_INDEX
from .projection import KroneckerProjector

SCALE_TOLERANCE = 1e-3
"""Largest relative misfit of the logits' gradient to ``alpha_i (softmax - onehot)`` at the labelled tokens:
float32 rounding stays orders of magnitude below it; label smoothing of 0.1 is about 0.1 off."""


def content_key(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> str:
    """A stable key of one example: its tokens under the attention mask and which of them are labelled
    (padding on either side, and the batch it was in, change nothing)."""
    kept = attention_mask.bool()
    tokens = input_ids[kept].to(torch.int64).cpu()
    labelled = (labels[kept] != IGNORE_INDEX).to(torch.uint8).cpu()
    digest = hashlib.sha256(tokens.numpy().tobytes())
    digest.update(labelled.numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class CapturedRows:
    """What a capture holds: per content key, each block's gradient row of the example's own mean token
    loss, its loss, and the optimizer step it was captured at."""

    blocks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # key -> block -> [width]
    losses: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass
class _Batch:
    keys: list[str]
    labels: torch.Tensor  # [b, T], shifted as the loss reads them
    counts: torch.Tensor  # [b] labelled tokens per example
    inputs: dict[str, torch.Tensor]  # block -> the module's input in this forward
    head: torch.Tensor | None = None  # the loss's input: the logits, or a fused head's label log-probs
    scale: torch.Tensor | None = None  # [b] alpha_i x n_i, set when the head's gradient arrives
    losses: torch.Tensor | None = None  # [b] each example's mean token loss, from the same logits
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # block -> [b, width] rows formed


class GradientHooks:
    """Hooks on ``modules`` (the trained linear maps, by block name) and on the ``model`` the loop calls,
    which keep per-example gradient rows of every training pass made while :attr:`active`.

    ``projector``: project each block's factors while forming them (LoGra-style), as a post-hoc collection
    with the same settings does. ``step``: the loop's current optimizer step, recorded with each row
    (default: the ordinal of the batch, from 1).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        modules: dict[str, torch.nn.Linear],
        projector: KroneckerProjector | None = None,
        step: Callable[[], int] | None = None,
    ) -> None:
        self.rows = CapturedRows()
        self.active = False
        self.batches_kept = 0  # training passes whose backward delivered every block's rows
        self._step = step if step is not None else lambda: self.batches_kept + 1
        self._modules = modules
        self._projections = {
            name: projector.block(name, *m.weight.shape)
            for name, m in modules.items()
            if projector is not None
        }
        self.rows.shapes = {
            name: self._projections[name].shape if name in self._projections else _shape(m)
            for name, m in modules.items()
        }
        # Each module's (input, output) of the forward under way: the model's own hook, which fires when
        # the whole forward returns and so after every module's, names the batch they belong to.
        self._forward: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [model.register_forward_hook(self._on_model, with_kwargs=True)]
        self._handles += [m.register_forward_hook(self._on_module(name)) for name, m in modules.items()]

    def remove(self) -> None:
        """Take every hook off (the model trains on as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _recording(self) -> bool:
        return self.active and torch.is_grad_enabled()

    # -- forward: each module's input and output, then the batch's keys, labels and logits
    def _on_module(self, name: str) -> Callable[..., None]:
        def keep(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._recording():
                self._forward[name] = (inputs[0].detach(), output)

        return keep

    def _on_model(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        forward, self._forward = self._forward, {}
        if not self._recording():
            return
        labels = kwargs.get("labels")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if labels is None or input_ids is None:
            raise ConfigError(
                "gradient capture needs the labels passed to the model: call model(input_ids=..., "
                "attention_mask=..., labels=...) in the training loop"
            )
        if set(forward) != set(self._modules):
            return  # not a forward through the trained modules (e.g. a frozen reference model)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        keys = [content_key(i, m, y) for i, m, y in zip(input_ids, mask, labels, strict=True)]
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        inputs = {name: pair[0] for name, pair in forward.items()}
        batch = _Batch(keys, shifted, (shifted != IGNORE_INDEX).sum(dim=1), inputs)
        # The loss's own input gradient arrives first in the backward pass (downstream of every module).
        read: _ScaleReader
        if getattr(output, "logits", None) is not None:
            head, read = output.logits, _loss_scale
        elif getattr(output, "log_probs", None) is not None:  # a fused LM head (TRL): no logits formed
            head, read = output.log_probs, _nll_scale
        else:
            raise ConfigError(
                "gradient capture reads the loss scale from the model's logits (or a fused head's "
                f"log_probs), and {type(output).__name__} has neither"
            )
        batch.head = head.detach()
        head.register_hook(self._on_head_grad(batch, read))
        for name, (_, out) in forward.items():
            out.register_hook(self._on_output_grad(name, batch))

    # -- backward
    def _on_head_grad(self, batch: _Batch, read: _ScaleReader) -> Callable[[torch.Tensor], None]:
        def read_scale(grad: torch.Tensor) -> None:
            assert batch.head is not None
            alpha, batch.losses = read(grad, batch.head, batch.labels)
            batch.scale = alpha * batch.counts.to(grad.device)
            batch.head = None  # the scale is all the rows need from it

        return read_scale

    def _on_output_grad(self, name: str, batch: _Batch) -> Callable[[torch.Tensor], None]:
        def form(grad_out: torch.Tensor) -> None:
            if batch.scale is None:
                return  # a backward that did not go through the logits: not the training loss
            with torch.no_grad():
                out_side, in_side = grad_out.float(), batch.inputs.pop(name).float()
                if name in self._projections:  # project the factors, never the [d_out, d_in] gradient
                    out_side = self._projections[name].output_side(out_side)
                    in_side = self._projections[name].input_side(in_side)
                rows = torch.einsum("bto,bti->boi", out_side, in_side).reshape(len(batch.keys), -1)
                batch.pending[name] = rows / batch.scale.to(rows).unsqueeze(1)
            if len(batch.pending) == len(self._modules):
                self._keep(batch)

        return form

    def _keep(self, batch: _Batch) -> None:
        assert batch.losses is not None
        step = self._step()
        pending = {name: rows.cpu() for name, rows in batch.pending.items()}  # one copy per block
        losses, counts = batch.losses.tolist(), batch.counts.tolist()
        for i, key in enumerate(batch.keys):
            if counts[i] == 0:
                continue  # no labelled token: no loss, no gradient to attribute
            self.rows.blocks[key] = {name: rows[i] for name, rows in pending.items()}
            self.rows.steps[key] = step
            self.rows.losses[key] = losses[i]
        batch.pending = {}
        self.batches_kept += 1


_ScaleReader = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(gradient of the loss's input, that input, shifted labels) -> (alpha per example, mean token loss)."""


def _shape(module: torch.nn.Linear) -> tuple[int, int]:
    return int(module.weight.shape[0]), int(module.weight.shape[1])


def _loss_scale(
    grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, ``alpha_i`` with ``d loss / d logits_t = alpha_i (softmax(logits_t) - onehot(y_t))`` at
    its labelled tokens, and its mean token cross-entropy.

    ``alpha_i`` is the least-squares fit of the label entries (``alpha_i (p_y - 1)``), checked at every
    labelled token; the whole vocabulary is checked at the first labelled token of each example, since a
    constant offset such as label smoothing's fits the label entries alone. Softmax over the vocabulary is
    the costly part of a step's logits, so only the log-normaliser is formed for every token."""
    with torch.no_grad():
        mask = labels != IGNORE_INDEX
        target = labels.clamp(min=0).unsqueeze(-1)
        log_norm = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
        token_loss = (log_norm - logits.gather(-1, target).float()).squeeze(-1)
        residual = (torch.exp(-token_loss) - 1.0) * mask  # d (sum of token losses) / d logit_y
        observed = grad.gather(-1, target).squeeze(-1).float() * mask
        alpha = (observed * residual).sum(dim=1) / (residual * residual).sum(dim=1).clamp(min=1e-30)
        misfit = (observed - alpha.unsqueeze(1) * residual).abs().amax(dim=1)
        size = observed.abs().amax(dim=1).clamp(min=1e-30)
        rows = torch.arange(len(labels), device=labels.device)
        first = mask.int().argmax(dim=1)  # each example's first labelled token
        whole = torch.softmax(logits[rows, first].float(), dim=-1)
        whole[rows, labels[rows, first].clamp(min=0)] -= 1.0
        expected = alpha.unsqueeze(1) * whole
        off = torch.linalg.vector_norm(grad[rows, first].float() - expected, dim=1)
        scale = torch.linalg.vector_norm(grad[rows, first].float(), dim=1).clamp(min=1e-30)
        labelled = mask.any(dim=1)
        if bool(((misfit > SCALE_TOLERANCE * size) | ((off > SCALE_TOLERANCE * scale) & labelled)).any()):
            raise ConfigError(
                "gradient capture: the training loss is not a multiple of each example's token "
                "cross-entropy (label smoothing, a weighted or custom loss?); capture supports plain "
                "cross-entropy losses only"
            )
        counts = mask.sum(dim=1)
        return alpha, (token_loss * mask).sum(dim=1) / counts.clamp(min=1)


def _nll_scale(
    grad: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_loss_scale`, for a fused LM head that hands the loss each label's log-probability: the
    loss ``-alpha_i sum_t log p_t`` has gradient ``-alpha_i`` at every labelled token (checked). The fused
    head scores positions 0 .. T-2 only (the last has no next token), so the labels are cut to its width."""
    with torch.no_grad():
        labels = labels[:, : grad.shape[1]]
        mask = labels != IGNORE_INDEX
        counts = mask.sum(dim=1).clamp(min=1)
        observed = -grad.float() * mask
        alpha = observed.sum(dim=1) / counts
        misfit = (observed - alpha.unsqueeze(1) * mask).abs().amax(dim=1)
        if bool((misfit > SCALE_TOLERANCE * alpha.abs().clamp(min=1e-30)).any()):
            raise ConfigError(
                "gradient capture: the training loss is not a multiple of each example's summed token "
                "log-likelihood (a weighted or custom loss?); capture supports plain cross-entropy only"
            )
        return alpha, -(log_probs.float() * mask).sum(dim=1) / counts
