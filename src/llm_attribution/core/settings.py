"""Settings as frozen dataclasses: one per pipeline stage, each field with its help text.

The CLI derives its options from these fields (see :mod:`llm_attribution.cli.options`), so an option is
declared once, here, with its default, help and validation. Settings round-trip through JSON
(:func:`to_dict` / :func:`from_dict`) so that a run folder records exactly what produced it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from .errors import ConfigError

S = TypeVar("S")
REQUIRED: Any = dataclasses.MISSING
"""The default of an option the user must give (a required ``--flag``, or a positional argument)."""


def option(
    default: Any,
    help: str,
    choices: Sequence[str] | None = None,
    flag: str | None = None,
    recorded: bool = True,
    positional: bool = False,
    recorded_at_default: bool = True,
) -> Any:
    """A dataclass field that is also a CLI option (``--field-name`` unless ``flag`` is given, or a
    positional argument); ``default=REQUIRED`` makes it one the user must give.

    ``recorded=False`` marks a field that cannot change any result (how often to checkpoint, say): it is
    left out of :func:`to_dict`, so a run folder neither records it nor refuses a rerun that changes it.
    ``recorded_at_default=False`` marks a field added after runs were made: recorded only when it differs
    from its default, so run folders and caches made before it existed still match a rerun at its default.
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "flag": flag,
        "recorded": recorded,
        "positional": positional,
        "recorded_at_default": recorded_at_default,
    }
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults are not allowed in settings; use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (validation helper)."""
    if not condition:
        raise ConfigError(message)


def require_positive(name: str, value: float | int) -> None:
    require(
        isinstance(value, int | float) and math.isfinite(value) and value > 0,
        f"--{name.replace('_', '-')} must be > 0, got {value!r}",
    )


def require_choice(name: str, value: str, choices: Sequence[str]) -> None:
    require(
        value in choices, f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}"
    )


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a settings dataclass (strings from ``from __future__`` evaluated)."""
    return typing.get_type_hints(cls)


def base_type(tp: Any) -> tuple[Any, bool]:
    """``(inner type, optional?)`` for ``X`` or ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def to_dict(settings: Any) -> dict[str, Any]:
    """JSON-ready dict of a settings dataclass (tuples become lists), without unrecorded fields."""
    return {
        f.name: list(v) if isinstance(v := getattr(settings, f.name), tuple) else v
        for f in dataclasses.fields(settings)
        if f.metadata.get("recorded", True)
        and (f.metadata.get("recorded_at_default", True) or getattr(settings, f.name) != f.default)
    }


def from_dict(cls: type[S], data: dict[str, Any]) -> S:
    """Rebuild a settings dataclass from :func:`to_dict` output; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} setting(s): {', '.join(sorted(unknown))}")
    hints = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        inner, _ = base_type(hints[key])
        kwargs[key] = tuple(value) if typing.get_origin(inner) is tuple and value is not None else value
    return cls(**kwargs)
