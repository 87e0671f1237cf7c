"""The Python API, mirroring the CLI: ``finetune``, ``collect``, ``attribute``, ``evaluate``, ``explain``,
and the settings they take (``FinetuneConfig`` with ``DataSettings``, ``ModelSettings``, ``LoraSettings``,
``PromptSettings``, ``TrainSettings``; ``GradientSettings``); and for a training script of one's own,
``GradientCaptureCallback`` (a ``transformers.TrainerCallback``) and ``capture_gradients`` (any torch
loop), which capture the per-example LoRA gradients of the training passes themselves.

Scores everywhere follow one convention: HIGHER = the training example supports the test output MORE.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data.settings import DataSettings
from .data.templates import PromptSettings
from .evaluation.metrics import Metrics
from .features.gradients import Features, GradientSettings
from .models.finetune import TrainSettings
from .models.settings import LoraSettings, ModelSettings
from .workflows.attribute import STUDY_METHODS, AttributeSettings, attribute_run
from .workflows.capture import GradientCaptureCallback, capture_gradients
from .workflows.curvature import CurvatureResult, CurvatureSettings, curvature_run
from .workflows.diagnose import run_features
from .workflows.explain import ExplainSettings, Explanation
from .workflows.explain import explain as explain_run
from .workflows.judge import judge_scores
from .workflows.runs import FinetuneConfig, FinetuneReport, finetune_run, open_run, run_with_adapter

__all__ = [
    "CurvatureSettings",
    "DataSettings",
    "FinetuneConfig",
    "GradientCaptureCallback",
    "GradientSettings",
    "LoraSettings",
    "ModelSettings",
    "PromptSettings",
    "TrainSettings",
    "adapter_run",
    "attribute",
    "capture_gradients",
    "collect",
    "curvature",
    "evaluate",
    "explain",
    "finetune",
]


def finetune(config: FinetuneConfig, run: str | Path, show: int = 0) -> FinetuneReport:
    """LoRA fine-tune ``config.model`` on ``config.data`` into the run folder (an adapter per epoch)."""
    return finetune_run(config, Path(run), show=show)


def adapter_run(
    config: FinetuneConfig,
    run: str | Path,
    adapter: str | Path,
    captured: str | Path | None = None,
    adapter_name: str | None = None,
) -> Path:
    """A run folder for a peft adapter trained elsewhere (what ``llm-attr run --adapter`` makes before
    scoring), with the training gradients a ``GradientCaptureCallback`` or ``capture_gradients`` kept
    when ``captured`` is given; then :func:`attribute` scores it."""
    loaded = run_with_adapter(
        config, Path(run), Path(adapter), Path(captured) if captured else None, adapter_name
    )
    return loaded.run


def collect(
    run: str | Path, epoch: int | None = None, gradients: GradientSettings | None = None
) -> tuple[Features, Features]:
    """Per-example LoRA gradients and representations of a run's train and test examples (stored, reused)."""
    return run_features(Path(run), epoch, gradients)


def attribute(
    run: str | Path,
    methods: Sequence[str] = STUDY_METHODS,
    method_options: Sequence[str] = (),
    epoch: int | None = None,
    gradients: GradientSettings | None = None,
) -> dict[str, Any]:
    """Score a run with ``methods``; returns and writes ``results.json`` (HIGHER = more supportive)."""
    run = Path(run)
    settings = AttributeSettings(methods=tuple(methods), method_options=tuple(method_options), epoch=epoch)
    loaded_run = open_run(run, epoch)
    config = loaded_run.config
    return attribute_run(loaded_run, settings, config.prompt, gradients or GradientSettings(), config.model)


def evaluate(
    scores: torch.Tensor | str | Path, data: str | DataSettings, scores_format: str = "ours"
) -> Metrics:
    """The study's accuracy and coverage of a score matrix (tensor or file) against a dataset's labels."""
    return judge_scores(scores, data, scores_format)


def explain(
    run: str | Path,
    prompt: str,
    response: str | None = None,
    methods: Sequence[str] = STUDY_METHODS,
    top: int = 10,
    epoch: int | None = None,
    tokens: bool = False,
) -> Explanation:
    """Each method's ``top`` training examples that most support ``response`` to ``prompt`` (the model's
    own greedy answer when ``response`` is None); HIGHER score = supports it more. ``tokens``: also each
    answer token's share of the top examples' scores (``Explanation.tokens``)."""
    settings = ExplainSettings(
        prompt=prompt, response=response, methods=tuple(methods), top=top, epoch=epoch, tokens=tokens
    )
    return explain_run(Path(run), settings)


def curvature(run: str | Path, settings: CurvatureSettings | None = None) -> CurvatureResult:
    """Reference scores from the true Hessian, Gauss-Newton and full Fisher of a finished run's training
    loss for a few test examples (``RUN/curvature/``); HIGHER = the training example supports more."""
    return curvature_run(Path(run), settings or CurvatureSettings())
