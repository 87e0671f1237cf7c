"""Built-in tasks, generated from code for any seed, shaped like the study's datasets.

They let every stage run (and be tested) without downloading data; ``--task grammars`` etc. resolves here.
"""

from __future__ import annotations

from collections.abc import Callable

from ..schema import TaskData
from .backdoor import make_backdoor
from .grammars import make_grammars
from .math_problems import make_math

BUILTIN_TASKS: dict[str, Callable[[int], TaskData]] = {
    "grammars": make_grammars,
    "math": make_math,
    "backdoor": make_backdoor,
}

__all__ = ["BUILTIN_TASKS", "make_backdoor", "make_grammars", "make_math"]
