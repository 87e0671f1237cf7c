"""Curvature-vector products of the training loss in LoRA space, and damped inverses of them by CG.

The training loss is ``L(theta) = (1/n) sum_i l_i(theta)``, ``l_i`` example ``i``'s mean next-token
cross-entropy over its labelled tokens (:func:`~.gradients.per_example_losses`, the loss whose
gradients :mod:`.gradients` collects), ``theta`` every LoRA matrix at once (or a chosen subset), flattened
as a :class:`ParameterLayout`: the blocks in module order, each row-major, exactly as a gradient block's
row. Three curvatures ``C`` of it, each applied to a batch of vectors (rows of an ``[m, D]`` matrix):

- ``hessian``: the true Hessian ``H = d^2 L / d theta^2`` over all LoRA parameters jointly (not block
  diagonal), by double backward: ``H v = d (g . v) / d theta`` with ``g`` the gradient kept differentiable.
  It is indefinite away from a minimum.
- ``gauss-newton``: ``G = (1/n) sum_i (1/c_i) sum_t J_it^T (diag p_it - p_it p_it^T) J_it``, ``J_it`` the
  Jacobian of the logits at labelled token ``t`` and ``p_it`` their softmax (the cross-entropy's Hessian
  in the logits). ``J v`` comes from the double-vjp trick (``u -> J^T u`` is linear in ``u``, so the
  gradient of ``(J^T u) . v`` w.r.t. ``u`` is ``J v``): reverse mode only, so it works through any model
  autograd can differentiate twice. Positive semi-definite.
- ``fisher``: the empirical Fisher ``F = (1/n) sum_i g_i g_i^T`` of the per-example gradients, full (not
  block diagonal): on one block it is the matrix ``exact`` inverts.

The model products batch training examples (``batch_size`` per forward pass) and all ``m`` vectors at
once (``is_grads_batched``: one vmapped backward per batch, not one per vector), so a handful of vectors
cost about one pass. The model is put in eval mode (no dropout), and attention runs in PyTorch's math
kernel, the one whose backward is itself differentiable (flash and memory-efficient kernels are not).

:func:`conjugate_gradients` solves ``(C + lambda I) x = b`` for a batch of right-hand sides, reporting
each one's relative residual, iterations and any negative curvature met; :func:`mean_diagonal` estimates
``trace(C) / D`` (Hutchinson) for a damping relative to the curvature's own scale.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.errors import ConfigError, DataError
from ..core.progress import ProgressBar, progress
from ..data.schema import Example
from ..data.templates import IGNORE_INDEX, PromptSettings, collate, encode_examples
from ..models.device import autocast
from ..models.tuning import lora_modules
from .gradients import check_rows, length_batches, per_example_losses

CURVATURES = ("hessian", "gauss-newton", "fisher")
MODEL_CURVATURES = ("hessian", "gauss-newton")

Operator = Callable[[torch.Tensor], torch.Tensor]
"""``[m, D] -> [m, D]``: a symmetric linear map applied to each row."""


@dataclass(frozen=True)
class ParameterLayout:
    """The LoRA parameters as one vector: the named blocks in order, each ``(o, i)`` matrix row-major."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]

    @classmethod
    def of_blocks(
        cls, blocks: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]]
    ) -> ParameterLayout:
        """The layout of gradient blocks (``Features.blocks`` and ``Features.shapes``), in their order."""
        for name, block in blocks.items():
            o, i = shapes.get(name, (0, 0))
            if o * i != block.shape[1]:
                raise DataError(
                    f"block {name}: {block.shape[1]} gradient columns are not a full {o} x {i} LoRA matrix "
                    "(curvature needs unprojected gradients)"
                )
        return cls(tuple(blocks), tuple(tuple(shapes[name]) for name in blocks))  # type: ignore[misc]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(o * i for o, i in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.widths)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[m, D]`` -> ``{block: [m, d_block]}`` (views)."""
        if flat.shape[-1] != self.size:
            raise DataError(f"vectors have {flat.shape[-1]} entries, the LoRA parameters {self.size}")
        return dict(zip(self.names, torch.split(flat, list(self.widths), dim=-1), strict=True))

    def join(self, blocks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{block: [m, d_block]}`` -> ``[m, D]``."""
        missing = [name for name in self.names if name not in blocks]
        if missing:
            raise DataError(f"blocks missing from the vectors: {', '.join(missing[:3])}")
        return torch.cat([blocks[name] for name in self.names], dim=-1)


class ModelCurvature:
    """``C V`` for ``C`` the Hessian or the Gauss-Newton matrix of the mean training loss over
    ``examples`` w.r.t. the LoRA matrices ``names`` (default: all of them; the rest stay fixed).

    Each call is one pass over the training examples, ``batch_size`` per forward pass; ``passes`` counts
    them. Products are formed in the model's precision and summed over batches in float64.
    """

    def __init__(
        self,
        model: PeftModel | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[Example],
        prompt: PromptSettings,
        kind: str,
        batch_size: int = 8,
        names: Sequence[str] | None = None,
        modules: dict[str, torch.nn.Linear] | None = None,
    ) -> None:
        if kind not in MODEL_CURVATURES:
            raise ConfigError(f"model curvature is one of {', '.join(MODEL_CURVATURES)}, got {kind!r}")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be > 0, got {batch_size!r}")
        if not examples:
            raise DataError("no training examples to take the curvature of")
        # The trained matrices by block name (default: the LoRA ones; a full fine-tune passes its own).
        modules = lora_modules(model) if modules is None else modules
        names = list(modules) if names is None else list(names)
        unknown = [name for name in names if name not in modules]
        if unknown or not names:
            raise DataError(f"no LoRA matrix named {', '.join(unknown[:3]) or '(none given)'}")
        model.eval()  # dropout off: the curvature of the trained, deterministic model
        self.model, self.kind = model, kind
        self.params = [modules[name].weight for name in names]
        for param in self.params:
            param.requires_grad_(True)  # an adapter loaded for inference has them frozen
        self.layout = ParameterLayout(tuple(names), tuple((p.shape[0], p.shape[1]) for p in self.params))
        self.encoded = encode_examples(examples, tokenizer, prompt)
        self.ids = [e.id for e in examples]
        self.pad_id = tokenizer.pad_token_id
        self.batches = length_batches(self.encoded, batch_size)
        self.device = self.params[0].device
        self.passes = 0

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """``C V`` for each row of ``vectors`` (``[m, D]``), in ``vectors``' dtype."""
        if vectors.ndim != 2 or vectors.shape[1] != self.layout.size:
            raise DataError(f"expected [m, {self.layout.size}] vectors, got {tuple(vectors.shape)}")
        self.passes += 1
        m = vectors.shape[0]
        tangents = [
            block.to(device=self.device, dtype=param.dtype).reshape(m, *param.shape)
            for block, param in zip(self.layout.split(vectors).values(), self.params, strict=True)
        ]
        total = torch.zeros(m, self.layout.size, dtype=torch.float64, device=self.device)
        n = len(self.encoded)
        for rows in progress(self.batches, desc=self.kind, total=len(self.batches)):
            batch = {
                k: v.to(self.device) for k, v in collate([self.encoded[i] for i in rows], self.pad_id).items()
            }
            labels = batch.pop("labels")
            with differentiable_twice(), autocast(self.model):
                logits = self.model(**batch, use_cache=False).logits
            if self.kind == "hessian":
                products = self._hessian(logits, labels, tangents, [self.ids[i] for i in rows], n)
            else:
                products = self._gauss_newton(logits, labels, tangents, n)
            total += torch.cat([p.reshape(m, -1).double() for p in products], dim=1)
        return total.to(device=vectors.device, dtype=vectors.dtype)

    def _hessian(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        tangents: list[torch.Tensor],
        ids: list[str],
        n: int,
    ) -> tuple[torch.Tensor, ...]:
        """This batch's share of ``H V``: the gradient of ``(sum_batch l_i) / n`` kept differentiable,
        then one vmapped backward of ``g . v`` for every vector."""
        loss, counts = per_example_losses(logits, labels)
        check_rows(loss.detach(), counts, ids)
        grads = torch.autograd.grad(loss.sum() / n, self.params, create_graph=True)
        return _materialized(
            torch.autograd.grad(
                grads, self.params, grad_outputs=tangents, is_grads_batched=True, allow_unused=True
            ),
            self.params,
            len(tangents[0]),
        )

    def _gauss_newton(
        self, logits: torch.Tensor, labels: torch.Tensor, tangents: list[torch.Tensor], n: int
    ) -> tuple[torch.Tensor, ...]:
        """This batch's share of ``G V = J^T H_z J V``: ``J V`` by the double-vjp trick, the softmax
        cross-entropy Hessian ``diag p - p p^T`` at each labelled token weighted ``1 / (c_i n)`` (the
        loss is a mean per example, then over examples), then ``J^T`` by one more vmapped backward."""
        z = logits.float()
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        mask = shifted != IGNORE_INDEX
        counts = mask.sum(dim=1, keepdim=True)
        if bool((counts == 0).any()):
            raise DataError("a training example has no token to score; raise --max-length")
        weight = mask / (counts * n)  # [b, T]
        u = torch.zeros_like(z, requires_grad=True)
        transposed = torch.autograd.grad(z, self.params, grad_outputs=u, create_graph=True)
        (jv,) = torch.autograd.grad(transposed, u, grad_outputs=tangents, is_grads_batched=True)
        p = torch.softmax(z.detach(), dim=-1)
        hjv = (p * jv - p * (p * jv).sum(dim=-1, keepdim=True)) * weight[..., None]
        return _materialized(
            torch.autograd.grad(z, self.params, grad_outputs=hjv, is_grads_batched=True, allow_unused=True),
            self.params,
            len(tangents[0]),
        )


def _materialized(
    grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor], m: int
) -> tuple[torch.Tensor, ...]:
    """Zeros for a parameter the products do not reach (e.g. a block the loss does not depend on)."""
    return tuple(
        g if g is not None else torch.zeros(m, *p.shape, dtype=p.dtype, device=p.device)
        for g, p in zip(grads, params, strict=True)
    )


def differentiable_twice() -> contextlib.AbstractContextManager[object]:
    """Attention in the math kernel: the fused kernels' backward passes have no derivative of their own."""
    return sdpa_kernel([SDPBackend.MATH])


class EmpiricalFisher:
    """``F V = (1/n) (V G^T) G`` from per-example gradient blocks, all blocks jointly (``G`` = the blocks
    side by side). One block at a time is cast to ``V``'s dtype, so float64 vectors get float64 products
    without a float64 copy of every gradient."""

    def __init__(self, blocks: Mapping[str, torch.Tensor], layout: ParameterLayout) -> None:
        self.blocks = {name: blocks[name] for name in layout.names}
        self.layout = layout
        self.rows = next(iter(self.blocks.values())).shape[0]
        if self.rows <= 0:
            raise DataError("no training gradients to form the Fisher of")
        self.passes = 0

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        parts = self.layout.split(vectors)
        coefficients = torch.zeros(vectors.shape[0], self.rows, dtype=vectors.dtype, device=vectors.device)
        for name, g in self.blocks.items():
            coefficients.addmm_(parts[name], g.to(device=vectors.device, dtype=vectors.dtype).T)
        return torch.cat(
            [
                coefficients @ g.to(device=vectors.device, dtype=vectors.dtype) / self.rows
                for g in self.blocks.values()
            ],
            dim=1,
        )

    def mean_diagonal(self) -> float:
        """``trace(F) / D`` exactly: the mean squared training gradient over every LoRA parameter (on one
        block, ``exact``'s damping divided by its scale, as ``BlockStatistics.damping`` computes it)."""
        squares = sum(float(g.double().square().sum()) for g in self.blocks.values())
        return squares / (self.rows * self.layout.size)


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's ``trace(C) / D``: the mean of ``z^T C z / D`` over Rademacher probes ``z``, and the
    standard error of that mean."""

    mean_diagonal: float
    standard_error: float
    probes: int


def mean_diagonal(
    operator: Operator, size: int, probes: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> TraceEstimate:
    """Hutchinson's estimate of ``trace(C) / D`` from ``probes`` Rademacher vectors (one batched call)."""
    if probes <= 0:
        raise ConfigError(f"probes must be > 0, got {probes!r}")
    generator = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (probes, size), generator=generator).to(dtype) * 2 - 1
    samples = (z * operator(z).to(dtype)).sum(dim=1) / size
    error = float(samples.std() / math.sqrt(probes)) if probes > 1 else math.nan
    return TraceEstimate(float(samples.mean()), error, probes)


@dataclass
class SolveResult:
    """What :func:`conjugate_gradients` found for each right-hand side (rows of ``solution``).

    ``relative_residual``: ``||(C + lambda I) x - b|| / ||b||`` recomputed from the returned ``x`` (one
    more product), not CG's recursive estimate. ``negative_curvature``: a search direction ``p`` with
    ``p^T (C + lambda I) p <= 0`` stopped that right-hand side there (the damped matrix is not positive
    definite, so CG's answer is not the solution; raise the damping). ``min_curvature``: the least
    ``p^T (C + lambda I) p / p^T p`` met, an upper bound on the damped matrix's smallest eigenvalue.
    """

    solution: torch.Tensor
    relative_residual: list[float]
    iterations: list[int]
    converged: list[bool]
    negative_curvature: list[bool]
    min_curvature: list[float]
    products: int = 0  # operator calls, the residual check included


def conjugate_gradients(
    operator: Operator,
    rhs: torch.Tensor,
    damping: float,
    max_iterations: int = 100,
    tolerance: float = 1e-4,
    desc: str = "conjugate gradients",
) -> SolveResult:
    """Solve ``(C + damping I) x = b`` for every row ``b`` of ``rhs`` (``[m, D]``) by conjugate gradients,
    all rows at once: each iteration applies ``C`` once to the rows still running. A row stops when its
    residual is at most ``tolerance * ||b||``, at ``max_iterations``, or on negative curvature. Runs in
    float64 (``operator`` may compute in lower precision)."""
    if not damping >= 0 or not math.isfinite(damping):
        raise ConfigError(f"damping must be a finite number >= 0, got {damping!r}")
    if max_iterations <= 0 or not tolerance > 0:
        raise ConfigError("CG needs max_iterations > 0 and tolerance > 0")

    def damped(v: torch.Tensor) -> torch.Tensor:
        return operator(v).to(torch.float64) + damping * v

    b = rhs.to(torch.float64)
    m = b.shape[0]
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(dim=1)
    b_norm = rr.sqrt()
    active = b_norm > 0  # b = 0 is solved by x = 0
    converged = ~active
    negative = torch.zeros(m, dtype=torch.bool)
    iterations = torch.zeros(m, dtype=torch.long)
    min_curvature = torch.full((m,), math.inf, dtype=torch.float64)
    products = 0
    with ProgressBar(max_iterations, desc) as bar:
        for _ in range(max_iterations):
            rows = torch.nonzero(active).flatten()
            if len(rows) == 0:
                break
            ap = damped(p[rows])
            products += 1
            iterations[rows] += 1
            pap = (p[rows] * ap).sum(dim=1)
            min_curvature[rows] = torch.minimum(min_curvature[rows], pap / (p[rows] * p[rows]).sum(dim=1))
            bent = pap <= 0  # not positive definite along p: stop this row, keep its last iterate
            negative[rows[bent]] = True
            active[rows[bent]] = False
            ok = ~bent
            rows, ap, pap = rows[ok], ap[ok], pap[ok]
            alpha = rr[rows] / pap
            x[rows] += alpha[:, None] * p[rows]
            r[rows] -= alpha[:, None] * ap
            new_rr = (r[rows] * r[rows]).sum(dim=1)
            done = new_rr.sqrt() <= tolerance * b_norm[rows]
            converged[rows[done]] = True
            active[rows[done]] = False
            beta = new_rr / rr[rows]
            p[rows] = r[rows] + beta[:, None] * p[rows]
            rr[rows] = new_rr
            worst = float((rr[active].sqrt() / b_norm[active]).max()) if bool(active.any()) else 0.0
            bar.update(1, residual=f"{worst:.2e}")
    residual = (damped(x) - b).norm(dim=1) / b_norm.clamp_min(1e-300)
    products += 1
    residual[b_norm == 0] = 0.0
    return SolveResult(
        solution=x,
        relative_residual=residual.tolist(),
        iterations=iterations.tolist(),
        converged=converged.tolist(),
        negative_curvature=negative.tolist(),
        min_curvature=[float(c) if math.isfinite(c) else math.nan for c in min_curvature.tolist()],
        products=products,
    )


def gradient_scores(
    solutions: torch.Tensor, train: Mapping[str, torch.Tensor], layout: ParameterLayout
) -> torch.Tensor:
    """Float32 ``[m, n_train]`` scores ``x_t . g_train_j``, summed block by block (no ``[n, D]`` copy of
    the training gradients); HIGHER = the training example supports the test output more."""
    parts = layout.split(solutions)
    n = next(iter(train.values())).shape[0]
    out = torch.zeros(solutions.shape[0], n, dtype=solutions.dtype, device=solutions.device)
    for name in layout.names:
        out.addmm_(parts[name], train[name].to(device=solutions.device, dtype=solutions.dtype).T)
    return out.float()


def spread_rows(n: int, count: int) -> list[int]:
    """``min(count, n)`` row indices spread evenly over ``range(n)`` (first and last included)."""
    if count <= 0 or n <= 0:
        return []
    if count >= n:
        return list(range(n))
    if count == 1:
        return [0]
    return sorted({round(k * (n - 1) / (count - 1)) for k in range(count)})
