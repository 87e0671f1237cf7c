"""Data: the :class:`Example` type, loaders, built-in tasks and deterministic subsampling."""

from __future__ import annotations

from .builtin import BUILTIN_TASKS
from .loaders import load_hub_dataset, load_task
from .schema import Example, TaskData
from .settings import DataSettings
from .subsample import split_train_test, subsample

__all__ = [
    "BUILTIN_TASKS",
    "DataSettings",
    "Example",
    "TaskData",
    "load_hub_dataset",
    "load_task",
    "split_train_test",
    "subsample",
]
