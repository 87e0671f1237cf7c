"""The file a training-loop capture leaves (:mod:`.capture`), and reading a dataset's rows back out of it.

```
CAPTURE/capture.safetensors   one tensor per block, [n, width] rows in key order; __losses__, __steps__
                              metadata: the content keys, block shapes, projection, what was captured
```

A reader asks for a list of examples; each is found by its content key (:func:`~.capture.content_key` of
the tokens the run's template makes of it), so the capture's order, and whatever else the loop trained on,
do not matter. An example the capture lacks is named in one line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from transformers import PreTrainedTokenizerBase

from ..core.errors import ConfigError, RunError
from ..core.storage import file_sha256, write_bytes_atomic
from ..data.schema import Example
from ..data.templates import PromptSettings, collate, encode_examples
from .capture import CapturedRows, content_key
from .gradients import Features

CAPTURE_FILE = "capture.safetensors"
LOSSES = "__losses__"
STEPS = "__steps__"


def write_capture(
    folder: Path, rows: CapturedRows, projection: dict[str, Any], about: dict[str, Any]
) -> Path:
    """Write ``rows`` to ``folder/capture.safetensors`` in one atomic write; returns the file."""
    if not len(rows):
        raise ConfigError(
            "gradient capture kept no example: no training pass ran while it was active (check the chosen "
            "steps or epochs), or the loop never called backward() on the model's loss"
        )
    keys = sorted(rows.blocks)
    names = list(rows.shapes)
    tensors = {name: torch.stack([rows.blocks[k][name] for k in keys]).contiguous() for name in names}
    tensors[LOSSES] = torch.tensor([rows.losses[k] for k in keys], dtype=torch.float32)
    tensors[STEPS] = torch.tensor([rows.steps[k] for k in keys], dtype=torch.int64)
    metadata = {
        "keys": json.dumps(keys),
        "shapes": json.dumps({name: list(shape) for name, shape in rows.shapes.items()}),
        "projection": json.dumps(projection, sort_keys=True),
        "about": json.dumps(about, sort_keys=True),
        "convention": "each row: the gradient of that example's own mean token loss, at its training step",
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CAPTURE_FILE
    write_bytes_atomic(path, save(tensors, metadata))
    return path


@dataclass(frozen=True)
class Capture:
    """A capture file opened for reading."""

    path: Path
    keys: dict[str, int]  # content key -> row
    shapes: dict[str, tuple[int, int]]
    projection: dict[str, Any]
    about: dict[str, Any]

    @classmethod
    def open(cls, folder: Path) -> Capture:
        path = folder / CAPTURE_FILE if folder.is_dir() else folder
        if not path.is_file():
            raise RunError(
                f"{folder} holds no gradient capture ({CAPTURE_FILE}); make one in the training script"
            )
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        keys = json.loads(meta["keys"])
        return cls(
            path,
            {key: row for row, key in enumerate(keys)},
            {name: (int(s[0]), int(s[1])) for name, s in json.loads(meta["shapes"]).items()},
            json.loads(meta["projection"]),
            json.loads(meta.get("about", "{}")),
        )

    def sha256(self) -> str:
        return file_sha256(self.path)

    def features(
        self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, prompt: PromptSettings
    ) -> Features:
        """The captured rows of ``examples``, in their order, found by the content of their tokens."""
        encoded = encode_examples(examples, tokenizer, prompt)
        rows: list[int] = []
        for example, enc in zip(examples, encoded, strict=True):
            one = collate([enc], tokenizer.pad_token_id)  # the mask a training batch gives it
            key = content_key(one["input_ids"][0], one["attention_mask"][0], one["labels"][0])
            if key not in self.keys:
                raise RunError(
                    f"the capture {self.path} holds no gradient of training example {example.id!r} "
                    f"({len(self.keys)} examples captured): it was not trained on in the captured steps, "
                    "or the training script tokenised it otherwise than this run's template"
                )
            rows.append(self.keys[key])
        index = torch.tensor(rows, dtype=torch.int64)
        with safe_open(str(self.path), framework="pt") as handle:
            blocks = {name: handle.get_tensor(name)[index] for name in self.shapes}
            losses = handle.get_tensor(LOSSES)[index]
        return Features(
            [e.id for e in examples],
            blocks,
            None,  # a training pass keeps no representation: representation methods collect post hoc
            losses,
            dict(self.shapes),
            texts=[e.text for e in examples],
            labels=[e.label for e in examples],
        )
