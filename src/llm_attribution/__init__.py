"""llm-attribution: which fine-tuning examples made this LLM do that, and how far to trust the answer.

Scores follow one convention everywhere: HIGHER = the training example supports the test output MORE.

The API: :func:`finetune`, :func:`collect`, :func:`attribute`, :func:`evaluate`, :func:`explain` and the
settings they take (imported lazily from :mod:`llm_attribution.api`, so ``import llm_attribution`` stays
cheap). ARCHITECTURE.md in the repository maps the packages.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__"]  # and, lazily, every name of llm_attribution.api.__all__


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name == "api":  # probes, and the submodule itself, are not API names
        raise AttributeError(f"module 'llm_attribution' has no attribute {name!r}")
    api = importlib.import_module(f"{__name__}.api")  # not `from . import`, which asks this hook again
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'llm_attribution' has no attribute {name!r}")
