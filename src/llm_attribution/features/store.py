"""The on-disk feature store: per-example gradients and representations, shard by shard.

```
FOLDER/<split>-<key>/      (a run keeps FOLDER at RUN/features, workflows/layout.py)
  manifest.json            fingerprint of everything that produced the features, shards with checksums
  shard-00000.safetensors  rows [0, shard_size): one tensor per LoRA block, plus representations, losses
  ...
  kronecker.safetensors    token-level Kronecker factors of the whole split (only when a method asks)
```

``key`` is a hash of the fingerprint, so a changed model, adapter, data, template, max length, dtype or
loss masking lands in another folder and is recomputed; a folder is reused only when its recorded
fingerprint equals the one asked for (compared in full, not just by hash). Shards are written to a
temporary name and renamed, and each carries a SHA-256 in the manifest that is checked on read, so a
crash leaves whole shards (which a rerun keeps) and a corrupted file is named, never read as data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from ..core import distributed
from ..core.errors import RunError
from ..core.pause import pause_point
from ..core.storage import read_json, write_bytes_atomic, write_json_atomic
from ..data.schema import Example
from .gradients import Features
from .kronecker import KroneckerFactors

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KRONECKER = "kronecker.safetensors"
REPRESENTATIONS_KEY = "__representations__"
LOSSES_KEY = "__losses__"
REPRESENTATION_GRADIENTS_KEY = "__representation_gradients__"
# 3: shards record each block's matrix shape (ekfac-example needs it), so older stores are recomputed
# 4: shards keep the representation gradients RepT needs
STORE_VERSION = 4


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """A short, stable hash of a JSON-able fingerprint."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


class FeatureStore:
    """Features of one split under one fingerprint, in a folder of its own below ``root``."""

    def __init__(self, root: Path, split: str, fingerprint: dict[str, Any], shard_size: int = 256) -> None:
        self.fingerprint = {"store_version": STORE_VERSION, **fingerprint}
        self.folder = root / f"{split}-{fingerprint_key(self.fingerprint)}"
        self.shard_size = shard_size

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def _manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"fingerprint": self.fingerprint, "shard_size": self.shard_size, "shards": {}}
        manifest = read_json(self.manifest_path)
        if manifest.get("fingerprint") != self.fingerprint:
            # Same hash, other content: never reuse (and never overwrite silently).
            raise RunError(f"{self.folder} holds features of other settings; delete it to recompute")
        if manifest.get("shard_size", self.shard_size) != self.shard_size:
            raise RunError(
                f"{self.folder} was stored with --shard-size {manifest['shard_size']}; pass it, or delete it"
            )
        return manifest

    def complete(self, n: int) -> bool:
        """Whether every shard of an ``n``-example split is stored."""
        shards = self._manifest()["shards"]
        return all(self._shard_name(i) in shards for i in range(0, n, self.shard_size))

    def _shard_name(self, start: int) -> str:
        return f"shard-{start // self.shard_size:05d}.safetensors"

    def compute(
        self, examples: Sequence[Example], collect: Callable[[Sequence[Example]], Features]
    ) -> Features:
        """Load stored shards and compute (then store) the missing ones; returns all rows in order."""
        return _concat(list(self._fill(examples, collect, read_stored=True)))

    def ensure(self, examples: Sequence[Example], collect: Callable[[Sequence[Example]], Features]) -> None:
        """Compute and store the missing shards, holding at most one shard in memory (for streaming)."""
        for _ in self._fill(examples, collect, read_stored=False):
            pass

    def _fill(
        self,
        examples: Sequence[Example],
        collect: Callable[[Sequence[Example]], Features],
        read_stored: bool,
    ) -> Iterator[Features]:
        """Each shard in order: read when stored (if ``read_stored``), else computed and stored."""
        manifest = self._manifest()
        for start in range(0, len(examples), self.shard_size):
            chunk = examples[start : start + self.shard_size]
            name = self._shard_name(start)
            if name in manifest["shards"]:
                if read_stored:
                    yield self._read_shard(name, manifest["shards"][name], chunk)
                continue
            features = collect(chunk)
            pause_point("features-shard")
            # Block order is the model's module order; safetensors sorts names, so the order is kept
            # here: scores sum over blocks, and a different order would round differently.
            metadata = {
                "ids": json.dumps(features.ids),
                "blocks": json.dumps(list(features.blocks)),
                "shapes": json.dumps(features.shapes),
            }
            data = save(_to_tensors(features), metadata=metadata)
            manifest["shards"][name] = {
                "rows": [start, start + len(chunk)],
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            distributed.on_main(self._write_file, name, data, manifest)  # under torchrun: rank 0 writes
            log.info(
                "%s: stored examples %d-%d of %d", self.folder.name, start, start + len(chunk), len(examples)
            )
            yield features

    @property
    def kronecker_path(self) -> Path:
        return self.folder / KRONECKER

    def stored_kronecker(self) -> KroneckerFactors | None:
        """The split's stored Kronecker factors (checked against the manifest), or None if not stored or
        stored by an earlier version with another token set."""
        entry = self._manifest().get("kronecker")
        if entry is None:
            return None
        path = self.kronecker_path
        data = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise RunError(f"{path} is missing or corrupted (checksum mismatch); delete it to recompute")
        tensors = load(data)
        if not KroneckerFactors.current(tensors):  # an earlier token set: gathered again, gradients kept
            log.info("%s: Kronecker factors of an earlier version; gathering them again", self.folder.name)
            return None
        return KroneckerFactors.from_tensors(tensors)

    def put_kronecker(self, factors: KroneckerFactors) -> None:
        """Keep the split's Kronecker factors (under torchrun rank 0 writes)."""
        data = save(factors.to_tensors())
        manifest = self._manifest()
        manifest["kronecker"] = {"sha256": hashlib.sha256(data).hexdigest(), "examples": factors.examples}
        distributed.on_main(self._write_file, KRONECKER, data, manifest)

    def _write_file(self, name: str, data: bytes, manifest: dict[str, Any]) -> None:
        write_bytes_atomic(self.folder / name, data)
        write_json_atomic(self.manifest_path, manifest)

    def load(self, examples: Sequence[Example]) -> Features:
        """Every stored shard of a complete split, checked against the manifest's checksums."""
        return _concat(list(self.shards(examples)))

    def shards(self, examples: Sequence[Example]) -> Iterator[Features]:
        """The stored shards of a complete split one at a time, in order, each checked when read."""
        manifest = self._manifest()
        for start in range(0, len(examples), self.shard_size):
            name = self._shard_name(start)
            if name not in manifest["shards"]:
                raise RunError(f"{self.folder}: shard {name} is missing")
            yield self._read_shard(name, manifest["shards"][name], examples[start : start + self.shard_size])

    def _read_shard(self, name: str, entry: dict[str, Any], chunk: Sequence[Example]) -> Features:
        path = self.folder / name
        if not path.is_file():
            raise RunError(f"feature shard {path} is missing; delete {self.folder} to recompute")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise RunError(f"feature shard {path} is corrupted (checksum mismatch); delete it to recompute")
        metadata = load_metadata(data)
        ids = [e.id for e in chunk]
        if json.loads(metadata.get("ids", "[]")) != ids:
            raise RunError(
                f"feature shard {path} holds other examples than asked for; delete it to recompute"
            )
        shapes = {name: (o, i) for name, (o, i) in json.loads(metadata.get("shapes", "{}")).items()}
        features = _from_tensors(load(data), ids, json.loads(metadata["blocks"]), shapes)
        features.texts = [e.text for e in chunk]  # the examples' own text and labels: never stored twice
        features.labels = [e.label for e in chunk]
        return features


def load_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory (its JSON header)."""
    header_len = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + header_len]).get("__metadata__", {}))


def _to_tensors(features: Features) -> dict[str, torch.Tensor]:
    tensors = {name: block.contiguous() for name, block in features.blocks.items()}
    tensors[LOSSES_KEY] = features.losses.contiguous()
    if features.representations is not None:
        tensors[REPRESENTATIONS_KEY] = features.representations.contiguous()
    if features.representation_gradients is not None:
        tensors[REPRESENTATION_GRADIENTS_KEY] = features.representation_gradients.contiguous()
    return tensors


def _from_tensors(
    tensors: dict[str, torch.Tensor], ids: list[str], order: list[str], shapes: dict[str, tuple[int, int]]
) -> Features:
    reps = tensors.get(REPRESENTATIONS_KEY)
    blocks = {name: tensors[name] for name in order}
    rep_grads = tensors.get(REPRESENTATION_GRADIENTS_KEY)
    return Features(ids, blocks, reps, tensors[LOSSES_KEY], shapes, representation_gradients=rep_grads)


def _concat(parts: list[Features]) -> Features:
    if len(parts) == 1:
        return parts[0]
    reps = [p.representations for p in parts]
    rep_grads = [p.representation_gradients for p in parts]
    return Features(
        ids=[i for p in parts for i in p.ids],
        blocks={name: torch.cat([p.blocks[name] for p in parts]) for name in parts[0].blocks},
        representations=torch.cat(reps) if all(r is not None for r in reps) else None,  # type: ignore[arg-type]
        losses=torch.cat([p.losses for p in parts]),
        shapes=parts[0].shapes,
        texts=[t for p in parts for t in p.texts] if all(p.texts is not None for p in parts) else None,  # type: ignore[union-attr]
        labels=[y for p in parts for y in p.labels] if all(p.labels is not None for p in parts) else None,  # type: ignore[union-attr]
        representation_gradients=(
            torch.cat(rep_grads) if all(g is not None for g in rep_grads) else None  # type: ignore[arg-type]
        ),
    )
