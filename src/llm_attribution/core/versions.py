"""Versions of everything that can change a result, recorded in every run folder."""

from __future__ import annotations

import platform
from importlib import metadata


def package_versions() -> dict[str, str]:
    names = ("llm-attribution", "torch", "transformers", "peft", "gguf", "datasets", "numpy")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
