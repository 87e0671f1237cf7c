"""LiSSA (Agarwal et al., 2017): the damped inverse-Fisher product by a stochastic fixed-point recursion.

``lissa`` -- the converging form. For one block, with the empirical Fisher ``F = (1/n) G^T G`` (or its
mini-batch estimate ``F_B``), DataInf's damping ``lambda``, a scale ``s`` and ``delta = lambda / s``:

    h_0 = v,    h_{t+1} = v + (1 - delta) h_t - F_B h_t / s,    result = h_T / s

A fixed point satisfies ``(delta I + F / s) h = v``, i.e. ``h = s (F + lambda I)^-1 v``, so ``h / s`` is
the same damped inverse as ``exact`` and ``datainf`` approximate. The error contracts by
``I - (F + lambda I) / s``: it converges iff ``s > (mu_max + lambda) / 2`` and needs about
``s / (mu_min + lambda)`` steps, where ``mu`` are F's eigenvalues (``mu_min = 0`` for LoRA blocks with
``n < d``, so ``depth`` must be several times ``s / lambda``). ``scale=None`` picks
``s = max_i ||g_i||^2 + lambda``, which bounds ``mu_max(F_B) + lambda`` for every batch, so no step expands.
A recursion whose iterate turns non-finite or grows past ``1e6 (s / lambda) ||v||`` (a converging one
stays below ``(s / lambda) ||v||``) stops with a :class:`LissaDivergenceWarning` naming the block.
``closed_form=True`` gives the same full-batch recursion's result after ``depth`` steps exactly, through
each block's Fisher eigendecomposition (``h_T / s = f(F) v`` with ``f(mu) = (1 - (1 - (mu + lambda) /
s)^(T+1)) / (mu + lambda)``), so the millions of steps a LoRA block needs cost one eigendecomposition:
this is how a converged LiSSA is measured at all.

``lissa-study`` -- what the study's official code ran (``influence_function(hvp_cal='LiSSA')`` in
plumprc/Failures-of-Influence-Functions-in-LLMs, ``utils.py``):

    h_0 = v,    h_{t+1} = v + h_t - (F h_t - lambda h_t) / 1000,    result = h_T  (no final division)

with ``alpha_const = 1`` and ``--iter`` 3 by default. The shipped score files match 3 iterations: their
LiSSA/Hessian-free ratio is ~4 = depth + 1. Damping enters with a minus sign (the fixed point would be
``1000 (F - lambda I)^-1 v``, which the iteration cannot reach: on F's null space it multiplies by
``1 + lambda/1000``), and after 3 steps ``h ~ (depth + 1) v - O(F/1000) v``: since ``F / 1000`` is tiny,
its scores are Hessian-free's times ``depth + 1`` plus a small correction, hence the same rankings.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ...core.errors import ConfigError
from ...core.seeds import block_seed
from ...core.settings import option, require, require_positive
from ..base import (
    DampedSettings,
    GradientBlocks,
    InnerProductMethod,
    live_blocks,
)
from ..passes import FisherProducts, TrainPasses, gather_rows
from ..registry import register

logger = logging.getLogger(__name__)

NOT_CONVERGED = 1e-2  # remaining relative error, in the slowest direction, that counts as unconverged
DIVERGENCE_FACTOR = 1e6  # times the largest norm a converging recursion can reach


class LissaDivergenceWarning(RuntimeWarning):
    """The LiSSA recursion blew up on a block: its scale is too small for that block's Fisher."""


@dataclass(frozen=True)
class LissaSettings(DampedSettings):
    """The recursion's scale, length, repetitions and mini-batching."""

    scale: float | None = option(
        None,
        "s in the recursion; must exceed (top Fisher eigenvalue + lambda)/2. None: a safe bound per block",
    )
    depth: int = option(
        100, "recursion steps; convergence needs several times scale/lambda (a warning says so)"
    )
    repeats: int = option(1, "independent recursions averaged (useful with mini-batches)")
    batch_size: int | None = option(
        None, "training gradients per step (sampled, seeded); None: all (deterministic)"
    )
    seed: int = option(0, "seed of the mini-batch sampling")
    closed_form: bool = option(
        False,
        "compute the full-batch recursion's depth-step result exactly through each block's Fisher "
        "eigendecomposition instead of stepping (same numbers; any depth, e.g. the millions of steps "
        "convergence needs on LoRA blocks, at the cost of one eigendecomposition)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale is not None:
            require_positive("scale", self.scale)
        for name in ("depth", "repeats") + (("batch_size",) if self.batch_size is not None else ()):
            value = getattr(self, name)
            require(isinstance(value, int), f"--{name.replace('_', '-')} must be an integer, got {value!r}")
            require_positive(name, value)
        require(isinstance(self.seed, int), f"--seed must be an integer, got {self.seed!r}")


def _device(test: GradientBlocks) -> torch.device:
    return next(iter(test.values())).device


def _warn_diverged(block_name: str, step: int, scale: float) -> None:
    warnings.warn(
        f"LiSSA diverged on block {block_name} after {step + 1} steps (scale {scale:.3g}): "
        f"the scale must exceed (largest Fisher eigenvalue + damping)/2; pass a larger "
        f"scale, or scale=None for a safe one",
        LissaDivergenceWarning,
        stacklevel=3,
    )


def _fisher_product(method: InnerProductMethod, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``(1/b) G^T G h`` for the rows of ``h``, accumulated over chunks of ``g``'s rows."""
    out = torch.zeros_like(h)
    for cols in method.chunks(g.shape[0]):
        gc = g[cols]
        out.addmm_(h @ gc.T, gc)
    return out / g.shape[0]


@register
class Lissa(InnerProductMethod):
    """Score = sum over blocks of ``LiSSA[(F + lambda I)^-1] g_test . g_train``; HIGHER = more supportive."""

    name = "lissa"
    summary = (
        "LiSSA recursion toward exact's inverse product; a partial sum unless its depth suffices (its "
        "notes and a warning say which)"
    )
    Settings = LissaSettings
    settings: LissaSettings

    def __init__(self, settings: LissaSettings | None = None) -> None:
        super().__init__(settings)
        self.not_converged: dict[str, int] = {}  # block -> steps needed, for blocks depth is too short for
        self.blocks_scored = 0

    def begin_scoring(self) -> None:
        self.not_converged = {}
        self.blocks_scored = 0

    def notes(self) -> dict[str, Any]:
        return {
            "depth": self.settings.depth,
            "converged": not self.not_converged,
            "blocks_not_converged": len(self.not_converged),
            "blocks": self.blocks_scored,
            "steps_needed": max(self.not_converged.values(), default=0),
        }

    def end_scoring(self, n_blocks: int) -> None:
        """Warns (one line) when ``depth`` was too short for the recursion to converge on some block."""
        self.blocks_scored = n_blocks
        if self.not_converged:
            worst = max(self.not_converged.values())
            logger.warning(
                "lissa: depth %d is too short to converge on %d of %d blocks (up to %d steps needed for 1%% "
                "error); scores are a partial LiSSA, not the inverse-Fisher product: raise lissa.depth or "
                "use exact",
                self.settings.depth,
                len(self.not_converged),
                n_blocks,
                worst,
            )

    def _check_depth(self, block_name: str, delta: float) -> None:
        # Directions in F's null space (every LoRA block with n < d has them) contract only by (1 - delta)
        # per step: after `depth` steps their error is (1 - delta)^depth of the start.
        if delta < 1.0 and (1.0 - delta) ** self.settings.depth > NOT_CONVERGED:
            self.not_converged[block_name] = math.ceil(math.log(1.0 / NOT_CONVERGED) / delta)

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """The full-batch recursion for every block at once, ``F h`` from :class:`FisherProducts` (for
        streamed blocks no wider than ``chunk_size`` the ``d x d`` Fisher, else one pass per step);
        mini-batches sample rows at random, so with ``batch_size`` each block's rows are gathered
        (:meth:`_minibatch_recursion`). Blocks too short of steps are noted in ``not_converged``."""
        cfg = self.settings
        names, dtype = live_blocks(train, test)
        if cfg.batch_size is not None and cfg.batch_size < train.rows:
            if cfg.closed_form:
                raise ConfigError(
                    "lissa.closed_form computes the full-batch recursion: drop lissa.batch_size"
                )
            return self._minibatch_recursions(train, test, names, dtype)
        if cfg.closed_form:
            return self._closed_forms(train, test, names, dtype)
        statistics = train.statistics()
        v, scale, delta, limit = {}, {}, {}, {}
        for name in names:
            lam = statistics[name].damping(cfg.damping_scale)
            scale[name] = cfg.scale if cfg.scale is not None else statistics[name].max_row_squares + lam
            delta[name] = lam / scale[name]
            self._check_depth(name, delta[name])
            v[name] = test[name].to(dtype=dtype)
            norm = max(float(v[name].norm()), torch.finfo(dtype).tiny)
            limit[name] = DIVERGENCE_FACTOR * max(1.0, 1.0 / delta[name]) * norm
        fisher = FisherProducts(train, names, cfg.chunk_size, _device(test), dtype)
        h = {name: block.clone() for name, block in v.items()}
        out: dict[str, torch.Tensor] = {}
        for step in range(cfg.depth):
            products = fisher(h)
            for name, product in products.items():
                h_next = v[name] + (1.0 - delta[name]) * h[name] - product / scale[name]
                if not float(h_next.norm()) <= limit[name]:  # also catches nan / inf
                    _warn_diverged(name, step, scale[name])
                    out[name] = h_next / scale[name]
                    del h[name]
                else:
                    h[name] = h_next
            if not h:
                break
        out.update({name: block / scale[name] for name, block in h.items()})
        return {name: out[name] for name in names}

    def _closed_forms(
        self, train: TrainPasses, test: GradientBlocks, names: list[str], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The full-batch recursion's result after ``depth`` steps, exactly, per block.

        With ``M = I - (F + lambda I) / s``, ``h_T = sum_{t <= T} M^t v``, so the result ``h_T / s`` is
        ``f(F) v`` with ``f(mu) = (1 - (1 - (mu + lambda) / s)^(T + 1)) / (mu + lambda)``: in F's
        eigenbasis a scalar per eigenvalue, and ``f(0)`` on the directions outside the training span."""
        parts = _rows_by_block(train, names)
        statistics = train.statistics()
        out = {}
        for name in names:
            lam = statistics[name].damping(self.settings.damping_scale)
            scale = self.settings.scale
            scale = scale if scale is not None else statistics[name].max_row_squares + lam
            self._check_depth(name, lam / scale)
            v = test[name].to(dtype=dtype)
            rows = gather_rows(parts.pop(name)).to(v.device, torch.float64)
            out[name] = _lissa_function(rows, v, lam, scale, self.settings.depth).to(dtype)
        return out

    def _minibatch_recursions(
        self, train: TrainPasses, test: GradientBlocks, names: list[str], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The recursion with seeded mini-batches of each block's training rows, gathered in memory."""
        parts = _rows_by_block(train, names)
        statistics = train.statistics()
        out = {}
        for name in names:
            v = test[name].to(dtype=dtype)
            rows = gather_rows(parts.pop(name)).to(v.device, dtype)
            out[name] = self._minibatch_recursion(
                name, rows, v, statistics[name].damping(self.settings.damping_scale)
            )
        return out

    def _minibatch_recursion(
        self, block_name: str, train_block: torch.Tensor, test_block: torch.Tensor, lam: float
    ) -> torch.Tensor:
        """The recursion on one block's test rows (``h`` is ``[m, d]``), each step's Fisher estimated on
        ``batch_size`` training rows drawn by a per-(block, repeat) seed."""
        cfg = self.settings
        assert cfg.batch_size is not None
        n = train_block.shape[0]
        scale = cfg.scale if cfg.scale is not None else float(train_block.square().sum(dim=1).max()) + lam
        delta = lam / scale
        self._check_depth(block_name, delta)
        batch = cfg.batch_size
        out = torch.zeros_like(test_block)
        last_step = 0.0
        for rows in self.chunks(test_block.shape[0]):
            v = test_block[rows]
            # A converging recursion keeps ||h|| <= (s / lambda) ||v||; far past that it has diverged.
            limit = (
                DIVERGENCE_FACTOR * max(1.0, 1.0 / delta) * max(float(v.norm()), torch.finfo(v.dtype).tiny)
            )
            for repeat in range(cfg.repeats):
                generator = torch.Generator().manual_seed(block_seed(cfg.seed, block_name, repeat))
                h = v.clone()
                for step in range(cfg.depth):
                    g = train_block[torch.randperm(n, generator=generator)[:batch].to(train_block.device)]
                    h_next = v + (1.0 - delta) * h - _fisher_product(self, g, h) / scale
                    norm = float(h_next.norm())
                    if not norm <= limit:  # also catches nan / inf
                        _warn_diverged(block_name, step, scale)
                        out[rows] = h_next / scale
                        return out
                    if step == cfg.depth - 1:
                        last_step = max(last_step, float((h_next - h).norm()) / max(norm, 1e-30))
                    h = h_next
                out[rows] += h / (scale * cfg.repeats)
        logger.debug(
            "lissa: block %s scale %.3g damping %.3g last relative step %.2e",
            block_name,
            scale,
            lam,
            last_step,
        )
        return out


def _rows_by_block(train: TrainPasses, names: list[str]) -> dict[str, list[torch.Tensor]]:
    """Every block's training rows in one pass, as chunks (``gather_rows`` joins them)."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for chunk in train:
        for name in names:
            parts[name].append(chunk[name])
    return parts


def _lissa_function(
    rows: torch.Tensor, test: torch.Tensor, lam: float, scale: float, depth: int
) -> torch.Tensor:
    """``f(F) v`` for every test row, ``F = rows^T rows / n`` (float64), through the eigendecomposition of
    the smaller of ``G G^T / n`` and ``G^T G / n``."""
    n, d = rows.shape

    def f(mu: torch.Tensor) -> torch.Tensor:
        shifted = mu + lam
        return (1.0 - torch.pow(1.0 - shifted / scale, depth + 1)) / shifted

    v = test.to(torch.float64)
    if n < d:
        mu, u = torch.linalg.eigh(rows @ rows.T / n)
        keep = mu > mu.max().clamp(min=0) * n * torch.finfo(torch.float64).eps  # the span's directions
        basis = (rows.T @ u[:, keep]) / torch.sqrt(n * mu[keep])  # F's eigenvectors with eigenvalue mu
        outside = f(torch.zeros((), dtype=torch.float64))
        coefficients = v @ basis
        return outside * v + (coefficients * (f(mu[keep]) - outside)) @ basis.T
    mu, basis = torch.linalg.eigh(rows.T @ rows / n)
    return ((v @ basis) * f(mu.clamp(min=0))) @ basis.T


@dataclass(frozen=True)
class LissaStudySettings(DampedSettings):
    """The official code's constants: scale 1000, few steps, DataInf's damping (with its sign)."""

    scale: float = option(1000.0, "the official code's fixed divisor (1e3)")
    depth: int = option(3, "recursion steps (the official default --iter is 3; the shipped scores used 3)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("scale", self.scale)
        require(isinstance(self.depth, int), f"--depth must be an integer, got {self.depth!r}")
        require_positive("depth", self.depth)


@register
class LissaStudy(InnerProductMethod):
    """The study's LiSSA as it ran; HIGHER = the training example supports the test output more."""

    name = "lissa-study"
    summary = "the study's own LiSSA as it ran (3 steps, damping with a minus sign): Hessian-free's ranking"
    Settings = LissaStudySettings
    settings: LissaStudySettings

    def transform_test(self, train: TrainPasses, test: GradientBlocks) -> dict[str, torch.Tensor]:
        """``h <- v + h - (F h - lambda h) / scale`` for ``depth`` steps, every block at once, ``F h``
        from :class:`FisherProducts`; ``h`` unscaled, as in the study."""
        cfg = self.settings
        names, dtype = live_blocks(train, test)
        statistics = train.statistics()
        damping = {name: statistics[name].damping(cfg.damping_scale) for name in names}
        v = {name: test[name].to(dtype=dtype) for name in names}
        h = {name: block.clone() for name, block in v.items()}
        fisher = FisherProducts(train, names, cfg.chunk_size, _device(test), dtype)
        for _ in range(cfg.depth):
            products = fisher(h)
            h = {
                name: v[name] + h[name] - (products[name] - damping[name] * h[name]) / cfg.scale
                for name in names
            }
        return h
