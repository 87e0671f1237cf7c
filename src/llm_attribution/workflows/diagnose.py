"""``llm-attr diagnose``: the study's section-4 analyses of a run, each written to
``RUN/diagnostics/<name>.json`` (:func:`~.layout.diagnostic_file`) and returned for printing."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.storage import write_json_atomic
from ..diagnostics.ihvp import DampingPoint, damping_sweep
from ..diagnostics.spectrum import BlockSpectrum, spectra, summarize_spectra
from ..features.gradients import Features, GradientSettings
from .attribute import AttributeSettings, collect_run_features, parse_method_options
from .convergence import EpochRow, convergence
from .layout import diagnostic_file
from .parameters import ParameterRow, parameters_vs_behaviour
from .runs import open_run


def run_features(
    run: Path, epoch: int | None = None, gradients: GradientSettings | None = None
) -> tuple[Features, Features]:
    """Per-example LoRA gradients and representations of a run's train and test examples (stored, reused)."""
    loaded_run = open_run(run, epoch)
    config = loaded_run.config
    features, _ = collect_run_features(
        loaded_run, config.prompt, gradients or GradientSettings(), config.model
    )
    return features["train"], features["test"]


def diagnose_spectrum(
    run: Path, epoch: int | None, damping_scale: float
) -> tuple[dict[str, BlockSpectrum], dict[str, float], Path]:
    """Per block the Fisher's spectrum against the damping, and the medians over blocks."""
    train, test = run_features(run, epoch)
    per_block = spectra(train.blocks, test.blocks, damping_scale=damping_scale)
    summary = summarize_spectra(per_block)
    record = {
        "summary": summary,
        "damping_scale": damping_scale,
        "epoch": epoch,
        "blocks": {name: dataclasses.asdict(s) for name, s in per_block.items()},
    }
    path = diagnostic_file(run, "spectrum")
    write_json_atomic(path, record)
    return per_block, summary, path


def diagnose_ihvp(
    run: Path,
    epoch: int | None,
    damping_scales: Sequence[float],
    methods: Sequence[str],
    method_options: Sequence[str],
    max_test: int,
) -> tuple[list[DampingPoint], Path]:
    """The damping sweep of the iHVP error and rank agreement (:func:`~..diagnostics.ihvp.damping_sweep`)."""
    options = parse_method_options(methods, method_options)
    train, test = run_features(run, epoch)
    points = damping_sweep(train.blocks, test.blocks, damping_scales, methods, options, max_test=max_test)
    record: dict[str, Any] = {
        "epoch": epoch,
        "methods": list(methods),
        "method_options": options,
        "max_test": max_test,
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


def diagnose_parameters(run: Path, generations: int) -> tuple[list[ParameterRow], Path]:
    """Parameter change against behaviour change per epoch."""
    rows = parameters_vs_behaviour(run, max_generations=generations)
    path = diagnostic_file(run, "parameters")
    write_json_atomic(path, {"epochs": [row.__dict__ for row in rows]})
    return rows, path
