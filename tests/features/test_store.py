"""The feature store: shards round-trip bit for bit, resume shard by shard; damage is named, never read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_attribution.core.errors import RunError
from llm_attribution.data.schema import Example
from llm_attribution.features.gradients import Features
from llm_attribution.features.store import FeatureStore

EXAMPLES = [Example(f"e{i}", f"p{i}", f"r{i}", "ab"[i % 2]) for i in range(10)]
FINGERPRINT = {"model": "m", "data": "d"}


def fake_features(chunk) -> Features:  # type: ignore[no-untyped-def]
    """Features whose values are a function of the example ids (so a wrong row is visible)."""
    seeds = torch.tensor([int(e.id[1:]) for e in chunk], dtype=torch.float32)
    return Features(
        [e.id for e in chunk],
        # module order, not alphabetical: the store must keep it
        {
            "z.lora_A": seeds[:, None] * torch.ones(len(chunk), 6),
            "a.lora_B": seeds[:, None] / 7 + torch.zeros(len(chunk), 3),
        },
        seeds[:, None] + torch.zeros(len(chunk), 4),
        seeds / 3,
        {"z.lora_A": (2, 3), "a.lora_B": (3, 1)},
    )


def _store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path, "train", FINGERPRINT, shard_size=4)


def test_shards_round_trip_in_order_and_are_reused(tmp_path) -> None:
    computed: list[int] = []
    first = _store(tmp_path).compute(EXAMPLES, lambda c: computed.append(len(c)) or fake_features(c))
    assert computed == [4, 4, 2]
    again = _store(tmp_path).compute(EXAMPLES, lambda c: computed.append(len(c)) or fake_features(c))
    assert computed == [4, 4, 2]  # nothing recomputed
    assert list(again.blocks) == ["z.lora_A", "a.lora_B"] and again.ids == first.ids
    assert again.shapes == {"z.lora_A": (2, 3), "a.lora_B": (3, 1)}
    for name in first.blocks:
        assert torch.equal(again.blocks[name], first.blocks[name])
    assert torch.equal(again.losses, first.losses) and torch.equal(
        again.representations, first.representations
    )


def test_missing_shards_are_computed_and_kept_ones_reused(tmp_path) -> None:
    whole = _store(tmp_path / "whole").compute(EXAMPLES, fake_features)
    computed: list[list[str]] = []
    cut = _store(tmp_path / "cut")
    cut.compute(EXAMPLES[:4], fake_features)  # as if killed after the first shard
    resumed = cut.compute(EXAMPLES, lambda c: computed.append([e.id for e in c]) or fake_features(c))
    assert computed == [["e4", "e5", "e6", "e7"], ["e8", "e9"]]
    assert all(torch.equal(resumed.blocks[n], whole.blocks[n]) for n in whole.blocks)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_shard_is_named_and_never_read(tmp_path, how: str) -> None:
    store = _store(tmp_path)
    store.compute(EXAMPLES, fake_features)
    shard = store.folder / "shard-00001.safetensors"
    _damage(shard, how)
    for call in (lambda: store.load(EXAMPLES), lambda: store.compute(EXAMPLES, fake_features)):
        with pytest.raises(RunError, match="corrupted") as error:
            call()
        assert str(shard) in str(error.value)


def test_a_missing_shard_and_a_damaged_manifest_are_named(tmp_path) -> None:
    store = _store(tmp_path)
    store.compute(EXAMPLES, fake_features)
    (store.folder / "shard-00002.safetensors").unlink()
    with pytest.raises(RunError, match=r"shard-00002\.safetensors is missing"):
        store.load(EXAMPLES)
    _damage(store.manifest_path, "truncate")
    with pytest.raises(RunError, match=r"manifest\.json is damaged"):
        store.load(EXAMPLES)


def test_another_fingerprint_lands_in_another_folder(tmp_path) -> None:
    a = _store(tmp_path)
    b = FeatureStore(tmp_path, "train", {**FINGERPRINT, "data": "other"}, shard_size=4)
    assert a.folder != b.folder
    # a folder whose manifest records other settings (a hash collision, or an edit) is refused, not read
    a.compute(EXAMPLES, fake_features)
    manifest = json.loads(a.manifest_path.read_text())
    manifest["fingerprint"]["model"] = "edited"
    a.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RunError, match="other settings"):
        a.compute(EXAMPLES, fake_features)
