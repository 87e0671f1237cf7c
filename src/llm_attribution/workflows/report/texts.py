"""A run's examples as the report shows them: the run's task, and each text on one line, cut short for a
dataset that is not built in, so a report never reproduces a harmful training example in full."""

from __future__ import annotations

from pathlib import Path

from ...core.storage import read_json
from ...data.builtin import BUILTIN_TASKS
from ...data.loaders import load_task
from ...data.schema import TaskData
from ..layout import SETTINGS_FILE
from ..runs import FinetuneConfig

CUT = 80  # characters of a user dataset's text shown
CUT_MARK = " [cut: not a built-in dataset]"


def run_task(run: Path) -> tuple[FinetuneConfig, TaskData]:
    """The settings a run was made with and its task's examples."""
    config = FinetuneConfig.from_dict(read_json(run / SETTINGS_FILE))
    return config, load_task(config.data)


def is_builtin(config: FinetuneConfig) -> bool:
    """Whether the run's texts come from a built-in generator (shown in full) rather than a user's data."""
    return config.data.task in BUILTIN_TASKS


def shown(text: str, builtin: bool) -> str:
    """``text`` on one line; a user dataset's cut to :data:`CUT` characters and marked as cut."""
    flat = " ".join(text.split())
    return flat if builtin or len(flat) <= CUT else flat[:CUT] + CUT_MARK
