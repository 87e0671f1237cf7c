"""Property tests of the loaders: valid rows round-trip exactly; a bad file is a DataError, nothing else."""

from __future__ import annotations

import contextlib
import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_attribution.core.errors import DataError
from llm_attribution.data import DataSettings, load_task

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(max_size=30)  # any unicode, newlines, quotes and empty strings included
labels = st.text(min_size=1, max_size=5)


@st.composite
def splits(draw: st.DrawFn) -> dict[str, list[dict[str, str]]]:
    """Train and test rows with unique ids and at least two training classes."""
    ids = draw(st.lists(st.text(min_size=1, max_size=12), min_size=4, max_size=24, unique=True))
    n_train = draw(st.integers(2, len(ids) - 1))
    first, second = draw(st.lists(labels, min_size=2, max_size=2, unique=True))

    def row(example_id: str, label: str) -> dict[str, str]:
        return {"id": example_id, "prompt": draw(text), "response": draw(text), "label": label}

    train = [
        row(i, first if n == 0 else second if n == 1 else draw(labels)) for n, i in enumerate(ids[:n_train])
    ]
    test = [row(i, draw(labels)) for i in ids[n_train:]]
    return {"train": train, "test": test}


def _write(folder: Path, split: str, rows: list[dict[str, Any]], fmt: str, ascii_only: bool) -> None:
    if fmt == "jsonl":
        lines = (json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows)
        (folder / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        return
    with (folder / f"{split}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "prompt", "response", "label"])
        writer.writeheader()
        writer.writerows(rows)


@FAST
@given(splits(), st.sampled_from(["jsonl", "csv"]), st.booleans())
def test_valid_rows_round_trip_exactly(
    data: dict[str, list[dict[str, str]]], fmt: str, ascii_only: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        folder.mkdir()
        for split, rows in data.items():
            _write(folder, split, rows, fmt, ascii_only)
        task = load_task(DataSettings(task=str(folder)))
    for split in ("train", "test"):
        got = [(e.id, e.prompt, e.response, e.label) for e in getattr(task, split)]
        assert got == [(r["id"], r["prompt"], r["response"], r["label"]) for r in data[split]]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)
field_names = st.sampled_from(["id", "prompt", "prompts", "response", "label", "variation", "other"])
rowish = st.dictionaries(field_names, json_values, max_size=6) | json_values
line = rowish.map(json.dumps) | st.text(max_size=20)  # valid JSON of any shape, or any text at all


@FAST
@given(st.lists(line, max_size=12), st.sampled_from(["jsonl", "csv"]))
def test_any_file_loads_or_is_a_data_error(lines: list[str], suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{suffix}"
        path.write_text("\n".join(lines), encoding="utf-8")
        try:
            task = load_task(DataSettings(task=str(path)))
        except DataError as error:
            assert "\n" not in str(error).strip()  # one line for the terminal
        else:
            assert len(task.train) > 0 and len(task.test) > 0 and len(task.labels) >= 2


@FAST
@given(st.binary(max_size=200))
def test_any_bytes_load_or_are_a_data_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(data)
        with contextlib.suppress(DataError):
            load_task(DataSettings(task=str(path)))
