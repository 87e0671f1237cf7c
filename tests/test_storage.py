"""Atomic writes leave either the old file or the new one, and what a killed writer left is cleaned up."""

from __future__ import annotations

import os

import pytest
import torch

from llm_attribution.core.errors import RunError
from llm_attribution.core.storage import atomic_dir, read_json, remove_stale_temporaries, write_bytes_atomic
from llm_attribution.scoring.store import ScoreStore


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    target = tmp_path / "f.bin"
    write_bytes_atomic(target, b"old")

    def fail(*args):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path) -> None:
    folder = tmp_path / "epoch-1"
    with atomic_dir(folder) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError
    assert (folder / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["epoch-1"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path) -> None:
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / ".exact.safetensors.k2j3.tmp").write_bytes(b"half")  # a killed file write
    (tmp_path / "adapters" / ".epoch-2.x8a.tmp").mkdir(parents=True)  # a killed folder write
    (tmp_path / "adapters" / ".epoch-2.x8a.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "scores" / "exact.safetensors"]
    for path in keep:
        path.write_text("keep")
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(keep)


def test_damaged_json_is_named(tmp_path) -> None:
    path = tmp_path / "results.json"
    path.write_text('{"methods": {')
    with pytest.raises(RunError, match=r"results\.json is damaged"):
        read_json(path)


def test_a_damaged_scores_file_is_named_when_read(tmp_path) -> None:
    store = ScoreStore(tmp_path / "scores")
    store.put("exact", {"k": 1}, torch.ones(2, 3), 0.1, {}, ["a", "b", "c"], ["x", "y"])
    assert torch.equal(store.read("exact"), torch.ones(2, 3))
    path = tmp_path / "scores" / "exact.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(RunError, match=r"exact\.safetensors is damaged"):
        store.read("exact")
