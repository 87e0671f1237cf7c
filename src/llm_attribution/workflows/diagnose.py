"""``llm-attr diagnose``: the study's section-4 analyses of a run, each written to
``RUN/diagnostics/<name>.json`` (:func:`~.layout.diagnostic_file`) and returned for printing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.settings import option, require, require_positive
from ..core.storage import write_json_atomic
from ..diagnostics.ihvp import SWEPT_METHODS, DampingPoint, damping_sweep
from ..diagnostics.spectrum import BlockSpectrum, spectra, summarize_spectra
from ..evaluation.metrics import evaluate
from ..features.gradients import Features, GradientSettings
from .attribute import AttributeSettings, parse_method_options
from .convergence import EpochRow, convergence
from .features import RunFeatures
from .layout import diagnostic_file, saved_epochs
from .lds import lds_measurements
from .parameters import ParameterRow, parameters_vs_behaviour
from .runs import open_run


def run_features(
    run: Path, epoch: int | None = None, gradients: GradientSettings | None = None
) -> tuple[Features, Features]:
    """Per-example LoRA gradients and representations of a run's train and test examples (stored, reused)."""
    loaded_run = open_run(run, epoch)
    config = loaded_run.config
    train, test, _ = RunFeatures(
        loaded_run, config.prompt, gradients or GradientSettings(), config.model
    ).in_memory()
    return train, test


@dataclass(frozen=True)
class SpectrumSettings:
    """Which adapter's Fisher, against which damping."""

    epoch: int | None = option(None, "the adapter of this epoch (default: the last)")
    damping_scale: float = option(0.1, "damping = scale x mean squared gradient (> 0)")

    def __post_init__(self) -> None:
        require_positive("damping_scale", self.damping_scale)
        if self.epoch is not None:
            require_positive("epoch", self.epoch)


@dataclass(frozen=True)
class IhvpSweepSettings:
    """The damping scales swept and the approximations compared with exact at each."""

    epoch: int | None = option(None, "the adapter of this epoch (default: the last)")
    damping_scales: tuple[float, ...] = option(
        (1e-3, 1e-2, 1e-1, 1.0, 10.0),
        "comma-separated positive scales; damping = scale x mean squared gradient, per block",
    )
    methods: tuple[str, ...] = option(
        SWEPT_METHODS, "approximations compared with exact: datainf, lissa, lissa-study"
    )
    method_options: tuple[str, ...] = option(
        (), "comma-separated method.option=value besides the damping, e.g. lissa.depth=500"
    )
    max_test: int = option(20, "test gradients per block for the iHVP error")

    def __post_init__(self) -> None:
        require(len(self.damping_scales) > 0, "--damping-scales must list at least one scale")
        for scale in self.damping_scales:
            require_positive("damping_scales", scale)
        unknown = sorted(set(self.methods) - {"datainf", "lissa", "lissa-study"})
        require(
            len(self.methods) > 0 and not unknown,
            f"the sweep compares datainf, lissa or lissa-study with exact; got {','.join(self.methods)}",
        )
        parse_method_options(self.methods, self.method_options)
        require_positive("max_test", self.max_test)
        if self.epoch is not None:
            require_positive("epoch", self.epoch)


@dataclass(frozen=True)
class ParametersSettings:
    """How many greedy generations judge the behaviour at each epoch."""

    generations: int = option(20, "test prompts generated per group and epoch")

    def __post_init__(self) -> None:
        require_positive("generations", self.generations)


def diagnose_spectrum(
    run: Path, settings: SpectrumSettings
) -> tuple[dict[str, BlockSpectrum], dict[str, float], Path]:
    """Per block the Fisher's spectrum against the damping, and the medians over blocks."""
    train, test = run_features(run, settings.epoch)
    per_block = spectra(train.blocks, test.blocks, damping_scale=settings.damping_scale)
    summary = summarize_spectra(per_block)
    record = {
        "summary": summary,
        "damping_scale": settings.damping_scale,
        "epoch": settings.epoch,
        "blocks": {name: dataclasses.asdict(s) for name, s in per_block.items()},
    }
    path = diagnostic_file(run, "spectrum")
    write_json_atomic(path, record)
    return per_block, summary, path


def diagnose_ihvp(run: Path, settings: IhvpSweepSettings) -> tuple[list[DampingPoint], Path]:
    """The damping sweep of the iHVP error and rank agreement (:func:`~..diagnostics.ihvp.damping_sweep`),
    and at every scale each method's accuracy, coverage and, where the run has retrained LDS subsets (of
    the last epoch), its LDS: does a damping that approximates better also answer better?"""
    options = parse_method_options(settings.methods, settings.method_options)
    loaded_run = open_run(run, settings.epoch)
    config, task = loaded_run.config, loaded_run.task
    train, test, _ = RunFeatures(loaded_run, config.prompt, GradientSettings(), config.model).in_memory()
    last = loaded_run.epoch is not None and settings.epoch in (None, saved_epochs(run)[-1])
    measured = lds_measurements(run, config.train.seed) if last else None
    train_labels, test_labels = [e.label for e in task.train], [e.label for e in task.test]

    def judge(scores: torch.Tensor) -> dict[str, float]:
        metrics = evaluate(scores, train_labels, test_labels)
        quality = {"accuracy": metrics.accuracy, "coverage": metrics.coverage}
        if measured is not None:
            quality["lds"] = measured.lds(scores)
        return quality

    points = damping_sweep(
        train.blocks,
        test.blocks,
        settings.damping_scales,
        settings.methods,
        options,
        settings.max_test,
        judge,
    )
    record: dict[str, Any] = {
        "epoch": settings.epoch,
        "lds_subsets": None if measured is None else int(measured.masks.shape[0]),
        "methods": list(settings.methods),
        "method_options": options,
        "max_test": settings.max_test,
        "points": [dataclasses.asdict(p) for p in points],
    }
    path = diagnostic_file(run, "ihvp")
    write_json_atomic(path, record)
    return points, path


def diagnose_convergence(
    run: Path, settings: AttributeSettings, gradients: GradientSettings
) -> tuple[list[EpochRow], Path]:
    """Attribution quality and gradient turn at every saved epoch."""
    rows = convergence(run, settings, gradients)
    path = diagnostic_file(run, "convergence")
    write_json_atomic(path, {"epochs": [row.__dict__ for row in rows]})
    return rows, path


def diagnose_parameters(run: Path, settings: ParametersSettings) -> tuple[list[ParameterRow], Path]:
    """Parameter change against behaviour change per epoch."""
    rows = parameters_vs_behaviour(run, max_generations=settings.generations)
    path = diagnostic_file(run, "parameters")
    write_json_atomic(path, {"epochs": [row.__dict__ for row in rows]})
    return rows, path
