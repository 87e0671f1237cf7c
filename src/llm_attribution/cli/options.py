"""Derive argparse options from settings dataclasses, and build settings back from parsed arguments."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

from ..core.errors import ConfigError
from ..core.settings import base_type, field_types

S = TypeVar("S")


def _flag(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(tp: Any) -> Any:
    inner, optional = base_type(tp)

    def convert(text: str) -> Any:
        if optional and text.strip().lower() in ("none", ""):
            return None
        if inner is bool:
            return _parse_bool(text)
        if typing.get_origin(inner) is tuple:
            item = typing.get_args(inner)[0] if typing.get_args(inner) else str
            parts = [part.strip() for part in text.split(",") if part.strip()]
            try:
                return tuple(item(part) for part in parts)
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid {item.__name__} in list: {text!r}") from None
        try:
            return inner(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {inner.__name__} value: {text!r}") from None

    return convert


def add_options(
    parser: argparse.ArgumentParser, cls: type, title: str | None = None, exclude: tuple[str, ...] = ()
) -> None:
    """Add one ``--option`` (or positional argument) per field of the settings dataclass ``cls``, defaults
    shown in the help; a field without a default is a required option."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = field_types(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        tp = hints[field.name]
        required = field.default is dataclasses.MISSING
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = field.metadata.get("help", "") + ("" if required else f" (default: {shown})")
        choices = field.metadata.get("choices")
        if choices:
            help_text += f"; one of: {', '.join(choices)}"
        inner, _ = base_type(tp)
        metavar = "LIST" if typing.get_origin(inner) is tuple else field.name.split("_")[-1].upper()
        if field.metadata.get("positional"):
            group.add_argument(field.name, type=_converter(tp), help=help_text, metavar=metavar)
            continue
        group.add_argument(
            _flag(field),
            dest=field.name,
            type=_converter(tp),
            default=argparse.SUPPRESS,
            required=required,
            help=help_text,
            metavar=metavar,
        )


def from_args(cls: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    """Build ``cls`` from parsed arguments: fields not given keep their dataclass defaults."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {name: getattr(args, name) for name in names if hasattr(args, name)}
    kwargs.update(overrides)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a wrong kind of value that __post_init__ did not name
        raise ConfigError(str(exc)) from None
