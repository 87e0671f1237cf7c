"""``llm-attr curvature``: reference scores from true curvature, for a handful of a run's test examples.

``exact`` inverts the block-diagonal empirical Fisher. This inverts, by conjugate gradients over all
LoRA parameters jointly, the damped curvature of the mean training loss (:mod:`..features.curvature`):
the true Hessian, the Gauss-Newton matrix, and the full empirical Fisher (the bridge to ``exact``: on a
one-block model the two coincide). For each chosen test example ``t`` it solves
``(C + lambda I) x_t = g_test_t`` and scores every training example ``j`` by ``x_t . g_train_j``
(HIGHER = supports more), writing ``RUN/curvature/<kind>.safetensors`` (``scores [t, n_train]``,
``test_rows``: indices into the run's test set) and ``RUN/curvature/curvature.json`` (settings, damping,
per-test residuals, iterations, negative-curvature flags, seconds).

Damping: ``lambda = damping_scale x m``, ``m`` the mean diagonal ``trace(C) / D`` of a curvature over the
``D`` LoRA parameters. With ``damping_basis=fisher`` (the default) ``m`` is the empirical Fisher's, exactly:
the mean squared training gradient, which is ``exact``'s per-block formula taken over all blocks at once,
so every kind is damped alike and, on one block, like ``exact``. With ``own`` it is each kind's own
trace, estimated by Hutchinson probes (the Fisher's computed exactly).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ..core.errors import ConfigError
from ..core.settings import option, require, require_choice, require_positive, to_dict
from ..core.storage import write_bytes_atomic, write_json_atomic
from ..features.curvature import (
    CURVATURES,
    EmpiricalFisher,
    ModelCurvature,
    Operator,
    ParameterLayout,
    conjugate_gradients,
    gradient_scores,
    mean_diagonal,
    spread_rows,
)
from ..features.gradients import GradientSettings
from .features import RunFeatures
from .layout import curvature_file, curvature_scores_file
from .runs import open_run

log = logging.getLogger(__name__)

DAMPING_BASES = ("fisher", "own")


@dataclass(frozen=True)
class CurvatureSettings:
    """Which curvatures, for how many test examples, damped how, solved how far."""

    epoch: int | None = option(None, "the adapter of this epoch (default: the last)")
    kinds: tuple[str, ...] = option(CURVATURES, "comma-separated curvatures: hessian, gauss-newton, fisher")
    test_examples: int = option(8, "test examples, spread evenly over the test set (first and last included)")
    damping_scale: float = option(0.1, "damping lambda = scale x the mean diagonal of --damping-basis (> 0)")
    damping_basis: str = option(
        "fisher",
        "fisher: the empirical Fisher's mean diagonal (mean squared training gradient, exact's formula over "
        "all LoRA parameters; one lambda for every kind); own: each kind's own, by Hutchinson probes",
        choices=DAMPING_BASES,
    )
    probes: int = option(16, "Rademacher probes of the Hutchinson trace estimate (damping basis own)")
    max_iterations: int = option(100, "conjugate-gradient iterations at most, per curvature")
    tolerance: float = option(
        1e-4, "stop a test example's CG at relative residual ||Ax - b|| / ||b|| <= this"
    )
    batch_size: int = option(8, "training examples per forward pass of a curvature product")

    def __post_init__(self) -> None:
        require(len(self.kinds) > 0, "--kinds must name at least one curvature")
        for kind in self.kinds:
            require_choice("kinds", kind, CURVATURES)
        require(len(set(self.kinds)) == len(self.kinds), f"--kinds lists a curvature twice: {self.kinds}")
        require_choice("damping_basis", self.damping_basis, DAMPING_BASES)
        for name in ("test_examples", "damping_scale", "probes", "max_iterations", "tolerance", "batch_size"):
            require_positive(name, getattr(self, name))
        for name in ("test_examples", "probes", "max_iterations", "batch_size"):
            require(isinstance(getattr(self, name), int), f"--{name.replace('_', '-')} must be an integer")
        if self.epoch is not None:
            require_positive("epoch", self.epoch)


@dataclass(frozen=True)
class CurvatureResult:
    """What :func:`curvature_run` wrote: per kind its score file, and the record of ``curvature.json``."""

    record: dict[str, Any]
    scores: dict[str, Path]
    path: Path


def curvature_run(run: Path, settings: CurvatureSettings) -> CurvatureResult:
    """Solve each curvature for ``settings.test_examples`` test gradients and score every training
    example; write the score files and ``curvature.json`` (see the module docstring)."""
    loaded_run = open_run(run, settings.epoch)
    config = loaded_run.config
    # Full gradients whatever the run scored with: the curvature lives in the LoRA parameters themselves.
    features = RunFeatures(
        loaded_run, config.prompt, GradientSettings(gradient_batch_size=settings.batch_size), config.model
    )
    train, test = features.load("train"), features.load("test")
    rows = spread_rows(len(test.ids), settings.test_examples)
    layout = ParameterLayout.of_blocks(train.blocks, train.shapes)
    index = torch.tensor(rows, dtype=torch.long)
    rhs = layout.join({name: test.blocks[name][index] for name in layout.names}).double()
    fisher = EmpiricalFisher(train.blocks, layout)
    kinds: dict[str, Any] = {}
    paths: dict[str, Path] = {}
    for kind in settings.kinds:
        operator: Operator = fisher
        if kind != "fisher":
            operator = ModelCurvature(
                loaded_run.model,
                loaded_run.tokenizer,
                loaded_run.task.train,
                config.prompt,
                kind,
                settings.batch_size,
                layout.names,
                loaded_run.weights.modules(),
            )
        start = time.perf_counter()
        damping = _damping(kind, operator, fisher, layout, settings)
        result = conjugate_gradients(
            operator, rhs, damping["lambda"], settings.max_iterations, settings.tolerance, desc=f"CG {kind}"
        )
        scores = gradient_scores(result.solution, train.blocks, layout)
        seconds = time.perf_counter() - start
        paths[kind] = curvature_scores_file(run, kind)
        write_bytes_atomic(
            paths[kind], save({"scores": scores.contiguous(), "test_rows": index.clone()}, {"kind": kind})
        )
        if any(result.negative_curvature):
            log.warning(
                "%s: negative curvature met for %d of %d test examples (the damped matrix is not positive "
                "definite); raise --damping-scale",
                kind,
                sum(result.negative_curvature),
                len(rows),
            )
        kinds[kind] = {
            "damping": damping,
            "relative_residual": result.relative_residual,
            "iterations": result.iterations,
            "converged": result.converged,
            "negative_curvature": result.negative_curvature,
            "min_curvature": result.min_curvature,
            "operator_products": result.products,
            "seconds": seconds,
            "scores": str(paths[kind].relative_to(run)),
        }
    record = {
        "convention": "higher score = the training example supports the test output more",
        "settings": to_dict(settings),
        "epoch": loaded_run.epoch,
        "adapter": str(loaded_run.adapter),
        "adapter_sha256": features.identity["adapter_sha256"],
        "parameters": layout.size,
        "n_train": len(train.ids),
        "test_rows": rows,
        "test_ids": [test.ids[i] for i in rows],
        "kinds": kinds,
    }
    path = curvature_file(run)
    write_json_atomic(path, record)
    for kind in CURVATURES:  # the record describes the score files there: none left from another call
        if kind not in kinds:
            curvature_scores_file(run, kind).unlink(missing_ok=True)
    return CurvatureResult(record, paths, path)


def _damping(
    kind: str,
    operator: Operator,
    fisher: EmpiricalFisher,
    layout: ParameterLayout,
    settings: CurvatureSettings,
) -> dict[str, Any]:
    """``{"lambda", "basis", "mean_diagonal", ...}``: the damping of one kind and how it was found."""
    if settings.damping_basis == "fisher" or kind == "fisher":
        basis = "fisher" if settings.damping_basis == "fisher" else "own"
        diagonal = fisher.mean_diagonal()
        extra: dict[str, Any] = {"estimate": "exact"}
    else:
        basis = "own"
        estimate = mean_diagonal(operator, layout.size, settings.probes)
        diagonal = estimate.mean_diagonal
        extra = {
            "estimate": "hutchinson",
            "probes": estimate.probes,
            "standard_error": estimate.standard_error,
        }
        if not diagonal > 0:
            raise ConfigError(
                f"the {kind}'s estimated mean diagonal is {diagonal:.3g} (not positive), so it cannot set a "
                "damping; use --damping-basis fisher"
            )
    return {
        "lambda": settings.damping_scale * diagonal,
        "scale": settings.damping_scale,
        "basis": basis,
        "mean_diagonal": diagonal,
        "formula": "lambda = scale x trace(C_basis) / D over all LoRA parameters",
        **extra,
    }
