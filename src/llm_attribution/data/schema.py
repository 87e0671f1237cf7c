"""The one example type every stage speaks, and a task's train/test pair."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.errors import DataError


@dataclass(frozen=True)
class Example:
    """One prompt/response pair with its class label.

    ``id`` is stable across runs (it keys score matrices and caches); ``label`` is the class that
    attribution is judged by (the study's ``variation`` field). A chat-format example also keeps its
    conversation as ``(role, content)`` pairs in ``messages`` (rendered by the model's chat template);
    its ``prompt`` and ``response`` are then the text of the turns before its last assistant turn and that
    turn, for what reads examples as text.
    """

    id: str
    prompt: str
    response: str
    label: str
    messages: tuple[tuple[str, str], ...] = ()

    @property
    def text(self) -> str:
        """Prompt and response as one text (what lexical methods such as BM25 index)."""
        return f"{self.prompt}\n{self.response}"


@dataclass(frozen=True)
class TaskData:
    """A task: named train and test splits of :class:`Example`."""

    name: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]

    def __post_init__(self) -> None:
        for split, examples in (("train", self.train), ("test", self.test)):
            if not examples:
                raise DataError(f"task '{self.name}': the {split} split is empty")
            ids = Counter(e.id for e in examples)
            dupes = [i for i, c in ids.items() if c > 1]
            if dupes:
                raise DataError(
                    f"task '{self.name}': duplicate example id(s) in {split}: {', '.join(dupes[:5])}"
                )

    @property
    def labels(self) -> tuple[str, ...]:
        """Sorted class labels present in the training split."""
        return tuple(sorted({e.label for e in self.train}))


def data_fingerprint(examples: Sequence[Example]) -> str:
    """SHA-256 over ids, prompts, responses and labels, in order: any change to the data changes it."""
    digest = hashlib.sha256()
    for e in examples:
        # a conversation is added only where there is one, so prompt/response data keep their fingerprints
        fields = [e.id, e.prompt, e.response, e.label] + ([list(e.messages)] if e.messages else [])
        digest.update(json.dumps(fields).encode())
    return digest.hexdigest()
