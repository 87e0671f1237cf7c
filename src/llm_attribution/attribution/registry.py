"""Methods by name. Every module in :mod:`llm_attribution.attribution.methods` is imported on the first
lookup, and each class it decorates with :func:`register` becomes a method: adding a method is adding
one file there, with no list to keep."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, TypeVar

from ..core.errors import ConfigError
from .base import (
    GRADIENT,
    REPLAY,
    REPRESENTATION,
    TEXT,
    InnerProductMethod,
    Method,
    ReplayMethod,
    RepresentationMethod,
    TextMethod,
)

M = TypeVar("M", bound=type[Method])
_REGISTRY: dict[str, type[Method]] = {}
_discovered = False
METHODS_PACKAGE = f"{__package__}.methods"


def register(cls: M) -> M:
    """Class decorator: make ``cls`` available to :func:`get_method` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    bases: dict[str, type[Method]] = {
        GRADIENT: InnerProductMethod,
        REPRESENTATION: RepresentationMethod,
        TEXT: TextMethod,
        REPLAY: ReplayMethod,
    }
    expected = bases.get(str(getattr(cls, "kind", "")))
    if expected is None or not issubclass(cls, expected):
        raise TypeError(
            f"{cls.__name__} must derive from InnerProductMethod (kind {GRADIENT!r}), RepresentationMethod "
            f"(kind {REPRESENTATION!r}), TextMethod (kind {TEXT!r}) or ReplayMethod (kind {REPLAY!r})"
        )
    for key in (name, *getattr(cls, "aliases", ())):
        existing = _REGISTRY.get(key)
        if existing is not None and existing is not cls:
            raise TypeError(
                f"attribution method name {key!r} is used by {existing.__name__} and {cls.__name__}"
            )
        _REGISTRY[key] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    # Imported by name: the method modules import this one (for register), not the other way round.
    package = importlib.import_module(METHODS_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{METHODS_PACKAGE}.{module.name}")
    _discovered = True


def available_methods() -> tuple[str, ...]:
    """Names of every registered method (an old name kept as an alias included), sorted."""
    _discover()
    return tuple(sorted(_REGISTRY))


def method_summaries() -> str:
    """One line per registered method: its name and what it computes (for ``--help``; aliases, which
    the summary names, are not listed again)."""
    canonical = [name for name in available_methods() if method_class(name).name == name]
    return "; ".join(f"{name}: {method_class(name).summary or '-'}" for name in canonical)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name`` (to read its ``kind`` or ``Settings`` before building it)."""
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown attribution method {name!r}; known methods: {known}") from None


def get_method(name: str, **options: Any) -> Method:
    """Build the method registered as ``name`` with settings ``options`` (unknown options -> ConfigError)."""
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Settings)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"method {name!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(sorted(fields))}"
        )
    return cls(cls.Settings(**options))
