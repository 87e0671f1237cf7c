"""Score matrices, one file per method, with a manifest that makes them a checked cache.

The store is handed its folder (a run keeps it at ``RUN/scores``, :mod:`~llm_attribution.workflows.layout`):

```
FOLDER/
  manifest.json          per method: the key its scores were computed under, the file's SHA-256, seconds
  <method>.safetensors   rows = test, columns = train; HIGHER = the training example supports the test more
  partial-<method>.safetensors   while a gradient method scores: its sum over the blocks done so far
```

A method's key holds the fingerprints of the features it scored (model, adapter weights, data content,
template, max length, loss masking, dtype) and the method's own settings, so scores are reused only when
nothing that produced them changed and the file still has its recorded checksum; anything else is
recomputed (a damaged file is named in a warning first). Each method's file and then the manifest are
written atomically as soon as that method is scored, so a run killed while scoring keeps what it finished;
within a method, the running sum over LoRA blocks is kept the same way (every few minutes), so a long
method resumes after its last saved block.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..attribution.base import PartialScores
from ..core.errors import RunError
from ..core.storage import file_sha256, read_json, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

SCORES_MANIFEST = "manifest.json"
CONVENTION = "higher = the training example supports the test output more"


class ScoreStore:
    """One folder of score matrices (a run's ``scores/``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest_path = folder / SCORES_MANIFEST

    def path(self, method: str) -> Path:
        """The file of ``method``'s ``[n_test, n_train]`` scores."""
        return self.folder / f"{method}.safetensors"

    def _partial_path(self, method: str) -> Path:
        return self.folder / f"partial-{method}.safetensors"

    def _manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"methods": {}, "ihvp": None, "partial": {}}
        try:
            manifest: dict[str, Any] = read_json(self.manifest_path)
        except (OSError, RunError) as exc:  # written atomically, so only outside damage gets here
            log.warning("cannot read %s (%s); every method is scored again", self.manifest_path, exc)
            return {"methods": {}, "ihvp": None, "partial": {}}
        manifest.setdefault("partial", {})
        return manifest

    def cached(self, method: str, key: dict[str, Any]) -> tuple[torch.Tensor, float] | None:
        """``(scores, seconds they took)`` stored under ``key``, or None when absent, stale or damaged."""
        entry = self._manifest()["methods"].get(method)
        if entry is None or entry.get("key") != key:
            return None
        path = self.path(method)
        try:
            scores = _load_checked(path, entry["sha256"], "scores")
        except DAMAGED as exc:
            log.warning("scores file %s is damaged or missing (%s); scoring %s again", path, exc, method)
            return None
        log.info("%s: reusing stored scores (same features and settings)", method)
        return scores, float(entry["seconds"])

    def put(
        self,
        method: str,
        key: dict[str, Any],
        scores: torch.Tensor,
        seconds: float,
        settings: dict[str, Any],
        train_ids: Sequence[str],
        test_ids: Sequence[str],
        notes: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``scores/<method>.safetensors`` (ids and settings in its metadata), then the manifest
        (with the method's ``notes`` on its computation, e.g. LiSSA's convergence)."""
        path = self.path(method)
        data = save(
            {"scores": scores.contiguous()}, metadata=score_metadata(method, settings, train_ids, test_ids)
        )
        write_bytes_atomic(path, data)
        self._record(method, key, hashlib.sha256(data).hexdigest(), seconds, notes)
        return path

    def put_file(
        self, method: str, key: dict[str, Any], seconds: float, notes: dict[str, Any] | None = None
    ) -> Path:
        """Record ``scores/<method>.safetensors``, already written in place (by streamed scoring, column
        block by column block), in the manifest with its checksum."""
        path = self.path(method)
        self._record(method, key, file_sha256(path), seconds, notes)
        return path

    def notes(self, method: str) -> dict[str, Any]:
        """What the method noted on computing its stored scores (empty when nothing, or none stored)."""
        entry = self._manifest()["methods"].get(method)
        return dict(entry.get("notes", {})) if entry else {}

    def _record(
        self, method: str, key: dict[str, Any], sha256: str, seconds: float, notes: dict[str, Any] | None
    ) -> None:
        manifest = self._manifest()
        manifest["methods"][method] = {"key": key, "sha256": sha256, "seconds": seconds}
        if notes:
            manifest["methods"][method]["notes"] = notes
        manifest["partial"].pop(method, None)
        write_json_atomic(self.manifest_path, manifest)
        self._partial_path(method).unlink(missing_ok=True)

    def cached_seconds(self, method: str, key: dict[str, Any]) -> float | None:
        """Like :meth:`cached`, but the file is only checked (hashed as a stream), not loaded: the seconds
        the stored scores took, or None when absent, stale or damaged."""
        entry = self._manifest()["methods"].get(method)
        if entry is None or entry.get("key") != key:
            return None
        path = self.path(method)
        try:
            if file_sha256(path) != entry["sha256"]:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError) as exc:
            log.warning("scores file %s is damaged or missing (%s); scoring %s again", path, exc, method)
            return None
        log.info("%s: reusing stored scores (same features and settings)", method)
        return float(entry["seconds"])

    def partial(self, method: str, key: dict[str, Any]) -> tuple[PartialScores, float] | None:
        """The running block sum of an unfinished scoring under ``key`` and its seconds so far, if any."""
        entry = self._manifest()["partial"].get(method)
        if entry is None or entry.get("key") != key:
            return None
        try:
            total = _load_checked(self._partial_path(method), entry["sha256"], "sum")
        except DAMAGED as exc:
            log.warning("partial scores of %s are damaged or missing (%s); starting it over", method, exc)
            return None
        log.info("%s: resuming after block %d", method, entry["blocks_done"])
        return PartialScores(entry["blocks_done"], total), float(entry["seconds"])

    def put_partial(self, method: str, key: dict[str, Any], partial: PartialScores, seconds: float) -> None:
        data = save({"sum": partial.sum.contiguous()})
        write_bytes_atomic(self._partial_path(method), data)
        manifest = self._manifest()
        manifest["partial"][method] = {
            "key": key,
            "sha256": hashlib.sha256(data).hexdigest(),
            "blocks_done": partial.blocks_done,
            "seconds": seconds,
        }
        write_json_atomic(self.manifest_path, manifest)

    def read(self, method: str) -> torch.Tensor:
        """The stored scores of ``method`` (HIGHER = more supportive), checked against the manifest's
        checksum when it has one; a damaged or missing file is a :class:`RunError` naming it."""
        path = self.path(method)
        entry = self._manifest()["methods"].get(method)
        try:
            return _load_checked(path, None if entry is None else entry["sha256"], "scores")
        except DAMAGED as exc:
            message = (
                f"scores file {path} is damaged or missing ({exc}); run the same command again to recompute"
            )
            raise RunError(message) from None

    def cached_ihvp(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The stored comparison of inverse-Fisher approximations with exact, when made under ``key``."""
        entry = self._manifest().get("ihvp")
        return entry["values"] if entry and entry.get("key") == key else None

    def put_ihvp(self, key: dict[str, Any], values: dict[str, Any]) -> None:
        manifest = self._manifest()
        manifest["ihvp"] = {"key": key, "values": values}
        write_json_atomic(self.manifest_path, manifest)


DAMAGED = (OSError, ValueError, KeyError, SafetensorError)
"""What reading a missing, damaged or tampered file raises (:func:`_load_checked`)."""


def _load_checked(path: Path, sha256: str | None, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file whose bytes must have checksum ``sha256`` (unchecked when
    None); raises one of :data:`DAMAGED` otherwise."""
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError("checksum mismatch")
    return load(data)[name]


def score_metadata(
    method: str, settings: Mapping[str, Any], train_ids: Sequence[str], test_ids: Sequence[str]
) -> dict[str, str]:
    """The metadata every score file carries: method, convention, settings, ids of its rows and columns."""
    return {
        "method": method,
        "convention": CONVENTION,
        "train_ids": json.dumps(list(train_ids)),
        "test_ids": json.dumps(list(test_ids)),
        "settings": json.dumps(dict(settings)),
    }
