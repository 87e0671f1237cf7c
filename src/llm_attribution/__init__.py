"""llm-attribution: which fine-tuning examples made this LLM do that, and how far to trust the answer.

Scores follow one convention everywhere: HIGHER = the training example supports the test output MORE.
"""

from __future__ import annotations

__version__ = "0.1.0"
