"""A LoRA fine-tuning run replayed as a differentiable function of per-example data weights (MAGIC).

:func:`~llm_attribution.models.finetune.finetune` takes AdamW steps on each batch's mean token loss. A
:class:`TrainingReplay` takes exactly those steps again: the same batches in the same order (the seeded
shuffle), the same dropout masks (the random state before each step restored), the same schedule,
clipping and AdamW arithmetic, written as tensor operations, with each training example's token losses
multiplied by a data weight ``w_i``. The batch loss is ``sum_i w_i s_i / N``: ``s_i`` the example's summed
token loss, ``N`` the batch's token count whatever the weights, so ``w = 1`` is the run as trained and
``w_i = 0`` the same run with example ``i``'s loss removed and every batch, mask and step otherwise as it was
(the counterfactual MAGIC's metagradient is the derivative of; arXiv 2504.16430).

:meth:`TrainingReplay.metagradients` is ``d L_test(theta_T) / d w`` for every training example at once,
by reverse-mode differentiation through the whole run: the states (adapter, AdamW moments; small under
LoRA) are kept from one forward replay, then each step is recomputed from its state with its gradient
kept differentiable, and one vector-Jacobian product carries the adjoint of (adapter, moments) one step
back and adds that batch's share of ``d/dw``. The adjoints of several test examples travel together
(``is_grads_batched``), so a group of queries shares each step's recomputation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..core.progress import ProgressBar
from ..data.schema import Example
from ..data.templates import Encoded, PromptSettings, collate, encode_examples
from ..models.device import autocast
from ..models.finetune import TrainSettings, batch_order, decay
from ..models.lora import lora_parameters
from .curvature import differentiable_twice
from .gradients import per_example_losses

# torch.optim.AdamW's default betas, which finetune() uses
BETA1, BETA2 = 0.9, 0.999
CLIP_EPS = 1e-6  # what clip_grad_norm_ adds to the norm


@dataclass(frozen=True)
class ReplayStep:
    """One optimisation step of the run: its batch (training rows), learning rate and AdamW step count."""

    rows: tuple[int, ...]
    learning_rate: float
    count: int  # 1-based, for AdamW's bias corrections


@dataclass(frozen=True)
class RandomState:
    """The random states dropout draws from before a step (the CUDA one on a GPU)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None


@dataclass(frozen=True)
class AdamState:
    """The trained LoRA matrices and AdamW's two moments, by parameter name."""

    params: dict[str, torch.Tensor]
    first: dict[str, torch.Tensor]
    second: dict[str, torch.Tensor]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.params.values(), *self.first.values(), *self.second.values()]

    def leaves(self) -> AdamState:
        """Detached copies that require grad: the inputs of one recomputed step."""

        def leaf(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().requires_grad_(True) for k, v in d.items()}

        return AdamState(leaf(self.params), leaf(self.first), leaf(self.second))

    def detached(self) -> AdamState:
        def cut(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach() for k, v in d.items()}

        return AdamState(cut(self.params), cut(self.first), cut(self.second))


def schedule(n_train: int, settings: TrainSettings, epochs: int | None = None) -> list[ReplayStep]:
    """The steps :func:`finetune` takes on ``n_train`` examples (the first ``epochs`` epochs of them)."""
    generator = torch.Generator().manual_seed(settings.seed)
    per_epoch = math.ceil(n_train / settings.batch_size)
    total = per_epoch * settings.epochs
    steps: list[ReplayStep] = []
    for _ in range(settings.epochs if epochs is None else epochs):
        for rows in batch_order(n_train, settings.batch_size, generator):
            count = len(steps)
            steps.append(ReplayStep(tuple(rows), settings.learning_rate * decay(count, total), count + 1))
    return steps


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with derivative 0 where ``x == 0``: a second moment is 0 only where every gradient so far was
    exactly 0 (LoRA's A before B leaves 0), and there the moment's own derivative is 0 too."""
    positive = x > 0
    return torch.where(positive, x, torch.ones_like(x)).sqrt() * positive


class TrainingReplay:
    """The fine-tuning run of ``model`` (a peft model at the run's initial adapter) on ``train``.

    Construct it right after restoring the state the run started from (the initial adapter and the
    random state after drawing it: :meth:`~llm_attribution.models.retrain.Retrainer.restore`): the
    random state (CPU, and CUDA on a GPU) at construction is the one the replay draws dropout from.
    ``epochs``: replay only the first epochs (attributing an earlier epoch's adapter).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        train: Sequence[Example],
        prompt: PromptSettings,
        settings: TrainSettings,
        epochs: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.settings = settings
        self.encoded: list[Encoded] = encode_examples(train, tokenizer, prompt)  # type: ignore[arg-type]
        self.pad_id: int = tokenizer.pad_token_id  # type: ignore[attr-defined]
        self.initial = {k: p.detach().clone() for k, p in lora_parameters(model).items()}  # type: ignore[arg-type]
        self.steps = schedule(len(train), settings, epochs)
        self.device = next(model.parameters()).device
        self.rng = self._random_state()
        self._states: list[AdamState] | None = None
        self._rngs: list[RandomState] = []
        self._final: AdamState | None = None
        # relative distance of the replay's end from the adapter the run saved, where someone measured it
        self.saved_difference: float | None = None

    @property
    def n_train(self) -> int:
        return len(self.encoded)

    # ------------------------------------------------------------------------------------------- forward

    def run(self, weights: torch.Tensor | None = None, desc: str = "replay") -> dict[str, torch.Tensor]:
        """Replay the run with data ``weights`` (default all 1) and return the final LoRA matrices; with the
        default weights the states and random states of every step are kept for :meth:`metagradients`."""
        keep = weights is None
        w = self._weights(weights)
        state = self._start()
        states, rngs = [], []
        self._restore(self.rng)
        self.model.train()
        with ProgressBar(len(self.steps), desc) as bar:
            for step in self.steps:
                if keep:
                    states.append(state)
                    rngs.append(self._random_state())
                state = self._step(state.leaves(), w, step, differentiable=False).detached()
                bar.update(1)
        self.model.eval()
        if keep:
            self._states, self._rngs, self._final = states, rngs, state
        return dict(state.params)

    def final(self) -> dict[str, torch.Tensor]:
        """The LoRA matrices the replay with all weights 1 ends with."""
        if self._final is None:
            self.run()
        assert self._final is not None
        return dict(self._final.params)

    # ------------------------------------------------------------------------------------------- reverse

    def metagradients(self, test: Sequence[Example], queries_per_pass: int = 4) -> torch.Tensor:
        """``[n_test, n_train]`` float64: ``d loss_j(theta_T) / d w_i`` for every test example ``j`` (its loss
        as the run attributes it, no dropout) and training example ``i``, at ``w = 1``."""
        if self._states is None:
            self.run()
        assert self._states is not None and self._final is not None
        encoded = encode_examples(test, self.tokenizer, self.prompt)  # type: ignore[arg-type]
        out = torch.zeros(len(encoded), self.n_train, dtype=torch.float64)
        groups = [
            range(i, min(i + queries_per_pass, len(encoded)))
            for i in range(0, len(encoded), queries_per_pass)
        ]
        with ProgressBar(len(groups) * len(self.steps), "metagradients") as bar:
            for rows in groups:
                out[rows.start : rows.stop] = self._reverse([encoded[i] for i in rows], bar)
        return out

    def _reverse(self, queries: list[Encoded], bar: ProgressBar) -> torch.Tensor:
        assert self._states is not None and self._final is not None
        q = len(queries)
        final = self._final.leaves()
        with torch.enable_grad():
            losses = self.test_losses(final.params, queries)
            eye = torch.eye(q, dtype=losses.dtype, device=losses.device)
            adjoint = list(
                torch.autograd.grad(
                    losses, list(final.params.values()), grad_outputs=eye, is_grads_batched=True
                )
            )
        zeros = [torch.zeros(q, *t.shape, dtype=t.dtype, device=t.device) for t in final.params.values()]
        adjoint += zeros + [z.clone() for z in zeros]  # the final moments do not move the test loss
        grad_w = torch.zeros(q, self.n_train, dtype=torch.float64)
        ones = torch.ones(self.n_train, dtype=next(iter(self.initial.values())).dtype, device=self.device)
        self.model.train()
        for t in range(len(self.steps) - 1, -1, -1):
            step = self.steps[t]
            state = self._states[t].leaves()
            w = ones[list(step.rows)].clone().requires_grad_(True)
            self._restore(self._rngs[t])  # the dropout masks this step drew
            with torch.enable_grad():
                after = self._step(state, w, step, differentiable=True, batch_weights=True)
                inputs = [w] if t == 0 else [w, *state.tensors()]  # the initial state is not a function of w
                grads = torch.autograd.grad(
                    after.tensors(),
                    inputs,
                    grad_outputs=adjoint,
                    is_grads_batched=True,
                )
            grad_w[:, list(step.rows)] += grads[0].double().cpu()
            adjoint = [g.detach() for g in grads[1:]]
            bar.update(1)
        self.model.eval()
        return grad_w

    # ------------------------------------------------------------------------------------------ one step

    def _random_state(self) -> RandomState:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return RandomState(torch.get_rng_state(), cuda)

    def _restore(self, state: RandomState) -> None:
        torch.set_rng_state(state.cpu)
        if state.cuda is not None:
            torch.cuda.set_rng_state(state.cuda, self.device)

    def test_losses(self, params: dict[str, torch.Tensor], queries: list[Encoded]) -> torch.Tensor:
        """Each query's mean token loss over the labels the run attributes, at LoRA matrices ``params``."""
        self.model.eval()
        batch = {k: v.to(self.device) for k, v in collate(queries, self.pad_id).items()}
        labels = batch.pop("labels")
        with differentiable_twice(), autocast(self.model):  # the precision finetune() trained in
            logits = functional_call(self.model, params, args=(), kwargs={**batch, "use_cache": False}).logits
        return per_example_losses(logits, labels)[0]

    def _weights(self, weights: torch.Tensor | None) -> torch.Tensor:
        dtype = next(iter(self.initial.values())).dtype
        if weights is None:
            return torch.ones(self.n_train, dtype=dtype, device=self.device)
        if weights.shape != (self.n_train,):
            raise ValueError(f"weights of shape {tuple(weights.shape)}, expected ({self.n_train},)")
        return weights.to(dtype=dtype, device=self.device)

    def _start(self) -> AdamState:
        params = {k: v.clone() for k, v in self.initial.items()}
        zeros = {k: torch.zeros_like(v) for k, v in self.initial.items()}
        return AdamState(params, zeros, {k: v.clone() for k, v in zeros.items()})

    def _step(
        self,
        state: AdamState,
        weights: torch.Tensor,
        step: ReplayStep,
        differentiable: bool,
        batch_weights: bool = False,
    ) -> AdamState:
        """One AdamW step as finetune() takes it, as a function of ``state`` and the data weights
        (``weights``: all n, or with ``batch_weights`` only this batch's)."""
        rows = list(step.rows)
        w = weights if batch_weights else weights[rows]
        batch = {
            k: v.to(self.device) for k, v in collate([self.encoded[i] for i in rows], self.pad_id).items()
        }
        labels = batch.pop("labels")
        names = list(state.params)
        twice = differentiable_twice() if differentiable else contextlib.nullcontext()
        with torch.enable_grad(), twice, autocast(self.model):
            logits = functional_call(
                self.model, state.params, args=(), kwargs={**batch, "use_cache": False}
            ).logits
            mean, counts = per_example_losses(logits, labels)
            loss = (w * mean * counts.to(mean.dtype)).sum() / counts.sum()
            grads = torch.autograd.grad(loss, [state.params[k] for k in names], create_graph=differentiable)
        if self.settings.max_grad_norm > 0:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = torch.clamp(self.settings.max_grad_norm / (norm + CLIP_EPS), max=1.0)
            grads = tuple(g * scale for g in grads)
        lr, wd = step.learning_rate, self.settings.weight_decay
        correction1 = 1 - BETA1**step.count
        correction2 = math.sqrt(1 - BETA2**step.count)
        params, first, second = {}, {}, {}
        for name, g in zip(names, grads, strict=True):
            theta = state.params[name] * (1 - lr * wd)
            first[name] = torch.lerp(state.first[name], g, 1 - BETA1)
            second[name] = state.second[name] * BETA2 + (1 - BETA2) * g * g
            denom = _safe_sqrt(second[name]) / correction2 + self.settings.adam_epsilon
            params[name] = theta - (lr / correction1) * first[name] / denom
        return AdamState(params, first, second)


__all__ = ["AdamState", "ReplayStep", "TrainingReplay", "schedule"]
