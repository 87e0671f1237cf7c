"""Judge any score matrix, ours or the study's official CSVs, against a dataset's labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.settings import REQUIRED, option
from ..data.loaders import load_task
from ..data.settings import DataSettings
from ..evaluation.metrics import Metrics, evaluate
from ..evaluation.score_files import FORMATS, check_score_shape, read_scores


@dataclass(frozen=True)
class EvaluateSettings:
    """A score matrix file and the dataset it is about."""

    scores: str = option(REQUIRED, "scores file: .safetensors (a run's), .npy, .csv, or official CSV")
    data: str = option(REQUIRED, "the dataset the scores are about (same as --task elsewhere)")
    scores_format: str = option(
        "ours", "ours: higher = more supportive; official: the study's CSV, lower = more influential", FORMATS
    )


def judge_scores(
    scores: torch.Tensor | str | Path, data: str | DataSettings, scores_format: str = "ours"
) -> Metrics:
    """The study's accuracy and coverage of a score matrix (tensor or file) against a dataset's labels."""
    settings = data if isinstance(data, DataSettings) else DataSettings(task=str(data))
    task = load_task(settings)
    matrix = scores if isinstance(scores, torch.Tensor) else read_scores(scores, scores_format)
    check_score_shape(
        matrix, len(task.test), len(task.train), "scores" if isinstance(scores, torch.Tensor) else scores
    )
    return evaluate(matrix, [e.label for e in task.train], [e.label for e in task.test])
