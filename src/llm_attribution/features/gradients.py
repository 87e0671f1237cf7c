"""Per-example gradients of every trained linear module (LoRA matrices, or the full weights of the base
model's linear layers), from batched forward/backward passes.

For a linear map ``y = W u`` applied at every token, the gradient of example ``i``'s loss is
``sum_t (dL_i/dy_t) u_t^T``: the layer's input and the gradient at its output, both of which one
batched backward pass already computes for all examples at once. Forward hooks keep each trained
module's input and output (the modules a :class:`~llm_attribution.models.tuning.TunedWeights` names);
``torch.autograd.grad`` of the SUM of per-example losses w.r.t. those
outputs gives, row by row, each example's own output gradient (examples do not interact: causal
attention with a padding mask), and one ``einsum`` per matrix forms all per-example gradients.
Cost: one training step per example, never a batch-size-1 loop.

Each example's loss is the mean over its own labelled tokens, so a gradient does not depend on which
other examples share its batch or on how much padding they bring.

With ``projection_dim`` set, each block's gradient is randomly projected on the fly (see
:mod:`.projection`): inputs and output gradients are projected before the ``einsum``, so a projected
gradient costs less than a full one and no full gradient is ever formed. For full fine-tuning (LoGra-style)
the projection is mandatory: a full layer's ``d_out x d_in`` gradient per example is refused beyond
:data:`~llm_attribution.models.tuning.FULL_UNPROJECTED_LIMIT` numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..core.errors import ConfigError, DataError, UserError
from ..core.progress import progress
from ..core.settings import option, require, require_positive
from ..data.schema import Example
from ..data.templates import IGNORE_INDEX, Encoded, PromptSettings, collate, encode_examples
from ..models.device import autocast
from ..models.moments import OptimizerMoments
from ..models.tuning import FULL_UNPROJECTED_LIMIT, LoraWeights, TunedWeights
from .kronecker import KroneckerFactors, flat_tokens, gradient_tokens
from .projection import KroneckerProjector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradientSettings:
    """How per-example gradients are collected: the batch size never changes them, a projection does
    (so it is part of the feature store's fingerprint)."""

    gradient_batch_size: int = option(8, "examples per batched backward pass when collecting gradients")
    projection_dim: int | None = option(
        None,
        "randomly project each LoRA matrix's per-example gradient to at most this many numbers "
        "(Kronecker-structured Gaussian: inner products unbiased, memory and scoring cost cut); "
        "None: keep full gradients",
    )
    projection_seed: int = option(0, "seed of the random projection (each block's derives from it)")

    def __post_init__(self) -> None:
        require_positive("gradient_batch_size", self.gradient_batch_size)
        if self.projection_dim is not None:
            require(
                isinstance(self.projection_dim, int),
                f"--projection-dim must be an integer, got {self.projection_dim!r}",
            )
            require_positive("projection_dim", self.projection_dim)
        require(
            isinstance(self.projection_seed, int),
            f"--projection-seed must be an integer, got {self.projection_seed!r}",
        )

    def projector(self) -> KroneckerProjector | None:
        """The projection these settings ask for (None: full gradients)."""
        if self.projection_dim is None:
            return None
        return KroneckerProjector(self.projection_dim, self.projection_seed)

    def fingerprint(self) -> dict[str, Any]:
        """What of these settings changes the gradients' values: only a projection (empty without one)."""
        if self.projection_dim is None:
            return {}
        return {
            "projection": {
                "kind": "kronecker-gaussian",
                "dim": self.projection_dim,
                "seed": self.projection_seed,
            }
        }


@dataclass
class Features:
    """Per-example features of a list of examples, rows in the examples' order.

    ``blocks``: trained module's block name -> float32 ``[n, d_block]`` gradients of each example's own loss
    (``[n, k_block]`` when projected).
    ``representations``: float32 ``[n, hidden]`` last-layer hidden state at the last prompt token (RepSim).
    ``representation_gradients``: float32 ``[n, hidden]`` the gradient of each example's own loss with
    respect to that hidden state (RepT), from the same backward pass as the weight gradients.
    ``losses``: float32 ``[n]`` each example's loss.
    ``shapes``: block name -> ``(o, i)``, the matrix each gradient row flattens (row-major): the
    trained matrix's weight shape, or its projected shape (empty when unknown, as in features built by hand).
    ``kronecker``: the split's token-level Kronecker factors (K-FAC, EK-FAC), when a method asked for them.
    ``texts``: each example's prompt and response (:attr:`~..data.schema.Example.text`), for text methods.
    ``learning_rates``: for features of several checkpoints stacked (:mod:`.checkpoints`), each epoch's
    mean learning rate; None for the features of one adapter.
    ``moments``: AdamW's moment estimates of each block at the features' checkpoint(s), when a method
    (LESS, TrackStar) asked for them.
    """

    ids: list[str]
    blocks: dict[str, torch.Tensor]
    representations: torch.Tensor | None
    losses: torch.Tensor
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    kronecker: KroneckerFactors | None = None
    texts: list[str] | None = None
    learning_rates: dict[int, float] | None = None
    moments: OptimizerMoments | None = None
    representation_gradients: torch.Tensor | None = None
    labels: list[str] | None = None  # each example's class label, for methods that value data by it


class _Capture:
    """Forward hooks that keep each LoRA matrix's input and output for one batch."""

    def __init__(self, modules: dict[str, torch.nn.Linear]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def keep(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.inputs[name] = inputs[0]
            self.outputs[name] = output

        return keep

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean next-token cross-entropy over its labelled tokens, and its labelled-token count
    (in float32 at least; float64 logits stay float64, which the replay's finite-difference tests need)."""
    # Shift the labels, not the logits: slicing [b, T, vocab] logits would copy them (as HF's loss avoids).
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    token_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
        shifted.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shifted)
    counts = (shifted != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts


def collect_features(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prompt: PromptSettings,
    settings: GradientSettings,
    representations: bool = True,
    desc: str = "gradients",
    weights: TunedWeights | None = None,
    kronecker: KroneckerFactors | None = None,
    encoded: Sequence[Encoded] | None = None,
) -> Features:
    """Per-example gradients of the trained weights (default: the LoRA matrices of a peft model), and
    RepSim representations, of ``examples``, in their order. With ``kronecker`` given, every block's
    token-level Kronecker factors (:mod:`.kronecker`) are added into it from the same pass. ``encoded``:
    the examples' tokens and labels when they are not the template's (per-token attribution labels one
    token of each copy).

    The model is put in eval mode (no dropout): attribution explains the trained, deterministic model.
    Examples are batched by length to limit padding, which does not change any result.
    """
    weights = LoraWeights(model) if weights is None else weights
    modules = weights.modules()
    projector = settings.projector()
    if weights.projection_required:
        _check_projected(modules, projector)
    model.eval()
    encoded = encode_examples(examples, tokenizer, prompt) if encoded is None else encoded
    for module in modules.values():
        module.weight.requires_grad_(True)  # an adapter loaded for inference has them frozen
    device = next(model.parameters()).device
    n = len(encoded)
    projections = {
        name: projector.block(name, *m.weight.shape) for name, m in modules.items() if projector is not None
    }
    widths = {
        name: projections[name].width if name in projections else m.weight.numel()
        for name, m in modules.items()
    }
    blocks = {name: torch.empty(n, widths[name], dtype=torch.float32) for name in modules}
    shapes = {
        name: projections[name].shape if name in projections else (m.weight.shape[0], m.weight.shape[1])
        for name, m in modules.items()
    }
    reps: torch.Tensor | None = None
    rep_grads: torch.Tensor | None = None
    losses = torch.empty(n, dtype=torch.float32)
    batches = length_batches(encoded, settings.gradient_batch_size)
    capture = _Capture(modules)
    try:
        for rows in progress(batches, desc=desc, total=len(batches)):
            batch = {
                k: v.to(device)
                for k, v in collate([encoded[i] for i in rows], tokenizer.pad_token_id).items()
            }
            labels = batch.pop("labels")
            if kronecker is not None:
                kronecker.count(len(rows))
            with autocast(model):  # bf16 base: low-precision forward; the einsums below sum in float32
                out = model(**batch, output_hidden_states=representations, use_cache=False)
            loss, counts = per_example_losses(out.logits, labels)
            check_rows(loss, counts, [examples[i].id for i in rows])
            names = list(modules)
            # An example's loss depends on no other row of the batch, so the gradient of the summed loss
            # with respect to row i's hidden state is that of example i's own loss (RepT's signature).
            wrt = [capture.outputs[k] for k in names]
            grads = torch.autograd.grad(
                loss.sum(), wrt + ([out.hidden_states[-1]] if representations else [])
            )
            index = torch.tensor(rows)
            with torch.no_grad():
                for name, grad_out in zip(names, grads[: len(names)], strict=True):
                    out_side, in_side = grad_out.float(), capture.inputs[name].detach().float()
                    if kronecker is not None:  # before projecting: which tokens carry a gradient at all
                        tokens = gradient_tokens(batch["attention_mask"], out_side)
                    if name in projections:  # project the factors, never the [d_out, d_in] gradient
                        out_side = projections[name].output_side(out_side)
                        in_side = projections[name].input_side(in_side)
                    if kronecker is not None:
                        kronecker.add(name, flat_tokens(in_side, tokens), flat_tokens(out_side, tokens))
                    per_example = torch.einsum("bto,bti->boi", out_side, in_side).reshape(len(rows), -1)
                    blocks[name][index] = per_example.cpu()
            losses[index] = loss.detach().float().cpu()
            if representations:
                last = torch.tensor([encoded[i].last_prompt_index for i in rows], device=device)
                hidden = out.hidden_states[-1][torch.arange(len(rows), device=device), last].float()
                if reps is None:
                    reps = torch.empty(n, hidden.shape[1], dtype=torch.float32)
                reps[index] = hidden.detach().cpu()
                at = grads[-1][torch.arange(len(rows), device=device), last].float()
                if rep_grads is None:
                    rep_grads = torch.empty(n, at.shape[1], dtype=torch.float32)
                rep_grads[index] = at.detach().cpu()
            capture.inputs.clear()
            capture.outputs.clear()
    finally:
        capture.remove()
    _check_finite(blocks, [e.id for e in examples])
    texts = [e.text for e in examples]
    return Features(
        [e.id for e in examples],
        blocks,
        reps,
        losses,
        shapes,
        texts=texts,
        representation_gradients=rep_grads,
        labels=[e.label for e in examples],
    )


def _check_projected(modules: dict[str, torch.nn.Linear], projector: KroneckerProjector | None) -> None:
    """Refuse, before any work, to form a large full layer's per-example gradient unprojected: ``d_out x
    d_in`` numbers per example and layer do not fit for any real model (a projected one is as wide as
    --projection-dim asks)."""
    for name, module in modules.items():
        d_out, d_in = module.weight.shape
        projected = projector is not None and projector.block(name, d_out, d_in).width < d_out * d_in
        if not projected and d_out * d_in > FULL_UNPROJECTED_LIMIT:
            raise ConfigError(
                f"--tuning full: the per-example gradient of {name} ({d_out} x {d_in}) would be formed "
                f"unprojected (more than {FULL_UNPROJECTED_LIMIT} numbers); give --projection-dim, e.g. "
                f"--projection-dim {FULL_UNPROJECTED_LIMIT}, to project it while it is collected"
            )


def length_batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Row indices in batches of ``batch_size``, sorted by length so that little padding is computed."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def check_rows(loss: torch.Tensor, counts: torch.Tensor, ids: list[str]) -> None:
    """A :class:`DataError` for an example with no labelled token, a :class:`UserError` for a
    non-finite loss (per row of a batch)."""
    empty = [ids[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise DataError(f"example(s) {', '.join(empty[:5])} have no token to score; raise --max-length")
    bad = [ids[i] for i in torch.nonzero(~torch.isfinite(loss)).flatten().tolist()]
    if bad:
        raise UserError(f"non-finite loss for example(s) {', '.join(bad[:5])}")


def _check_finite(blocks: dict[str, torch.Tensor], ids: list[str]) -> None:
    for name, block in blocks.items():
        bad_rows = torch.nonzero(~torch.isfinite(block).all(dim=1)).flatten().tolist()
        if bad_rows:
            names = ", ".join(ids[i] for i in bad_rows[:5])
            raise UserError(f"non-finite gradient in block {name} for example(s) {names}")
