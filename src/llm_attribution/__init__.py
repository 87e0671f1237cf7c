"""llm-attribution: which fine-tuning examples made this LLM do that, and how far to trust the answer.

Scores follow one convention everywhere: HIGHER = the training example supports the test output MORE.

The API in four calls: :func:`finetune`, :func:`collect`, :func:`attribute`, :func:`evaluate` (imported
lazily, so ``import llm_attribution`` stays cheap).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["attribute", "collect", "evaluate", "finetune"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'llm_attribution' has no attribute {name!r}")
