"""``load_task`` on every kind of source, made in tmp_path, and every error a user can hit."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from llm_attribution.core.errors import DataError
from llm_attribution.data import DataSettings, load_hub_dataset, load_task
from llm_attribution.data import loaders as loaders_module


def rows(n: int, *, prompt: str = "prompt", label: str = "label", labels: str = "ab") -> list[dict[str, Any]]:
    return [
        {prompt: f"question {i}", "response": f"answer {i}", label: labels[i % len(labels)]} for i in range(n)
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``datasets.load_dataset`` caches out of the user's home folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def load(task: Path | str, **kwargs: Any) -> Any:
    return load_task(DataSettings(task=str(task), **kwargs))


def test_builtin_task_with_limits_is_stratified_and_seeded() -> None:
    task = load("grammars", train_limit=30, test_limit=10, data_seed=4)
    assert (len(task.train), len(task.test), len(task.labels)) == (30, 10, 10)
    assert task == load("grammars", train_limit=30, test_limit=10, data_seed=4)


def test_save_to_disk_dataset_dict_with_study_field_names(tmp_path: Path) -> None:
    splits = {
        "train": rows(12, prompt="prompts", label="variation"),
        "test": rows(4, prompt="prompts", label="variation"),
    }
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        tmp_path / "study"
    )
    task = load(tmp_path / "study")
    assert task.name == "study"
    assert (len(task.train), len(task.test)) == (12, 4)
    assert task.train[3].id == "train-3"
    assert task.train[3].prompt == "question 3"
    assert task.train[3].label == "b"


def test_save_to_disk_single_dataset_is_split_by_fraction(tmp_path: Path) -> None:
    datasets.Dataset.from_list(rows(40)).save_to_disk(tmp_path / "one")
    task = load(tmp_path / "one", test_fraction=0.25)
    assert (len(task.train), len(task.test)) == (30, 10)
    assert {e.label for e in task.test} == {"a", "b"}
    assert all(e.id.startswith("row-") for e in task.train + task.test)


def test_jsonl_file_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", rows(20, labels="aaab"))
    task = load(path, test_fraction=0.2)
    assert (len(task.train), len(task.test)) == (16, 4)
    assert sorted(e.label for e in task.test) == ["a", "a", "a", "b"]
    assert task == load(path, test_fraction=0.2)
    assert task != load(path, test_fraction=0.2, data_seed=1)


def test_csv_file_with_integer_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", [{**r, "label": i % 3} for i, r in enumerate(rows(30))])
    task = load(path)
    assert task.name == "data"
    assert task.labels == ("0", "1", "2")


def test_folder_of_jsonl_and_csv_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(10))
    write_jsonl(tmp_path / "test.jsonl", rows(4))
    task = load(tmp_path)
    assert (len(task.train), len(task.test)) == (10, 4)
    assert task.test[2].id == "test-2"
    other = tmp_path / "csvs"
    other.mkdir()
    write_csv(other / "fit.csv", rows(6))
    write_csv(other / "holdout.csv", rows(2))
    assert len(load(other, train_split="fit", test_split="holdout").test) == 2


def test_custom_field_names_and_id_field(tmp_path: Path) -> None:
    records = [{"key": f"k{i}", "q": f"q{i}", "a": f"a{i}", "cls": "xy"[i % 2]} for i in range(10)]
    path = write_jsonl(tmp_path / "custom.jsonl", records)
    task = load(path, prompt_field="q", response_field="a", label_field="cls", id_field="key")
    by_id = {e.id: e for e in task.train + task.test}
    assert set(by_id) == {f"k{i}" for i in range(10)}
    assert (by_id["k3"].prompt, by_id["k3"].response, by_id["k3"].label) == ("q3", "a3", "y")


def test_generated_ids_are_stable_under_subsampling(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(50))
    write_jsonl(tmp_path / "test.jsonl", rows(10))
    full = {e.id: e for e in load(tmp_path).train}
    for example in load(tmp_path, train_limit=7, data_seed=2).train:
        assert full[example.id] == example


def test_load_hub_dataset_on_a_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "hub-like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows(8))
    write_jsonl(folder / "test.jsonl", rows(2))
    loaded = load_hub_dataset(str(folder), cache_dir=tmp_path / "cache")
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].num_rows == 8


def test_folder_of_other_data_files_goes_through_load_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_list(rows(6)).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_list(rows(2)).to_parquet(str(folder / "test.parquet"))
    task = load(folder)
    assert (len(task.train), len(task.test)) == (6, 2)


def test_hub_id_is_loaded_with_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    dataset_dict = datasets.DatasetDict({s: datasets.Dataset.from_list(rows(6)) for s in ("train", "test")})
    calls: list[str] = []
    monkeypatch.setattr(loaders_module, "load_hub_dataset", lambda name: calls.append(name) or dataset_dict)
    task = load("someone/some-data")
    assert calls == ["someone/some-data"]
    assert task.name == "someone/some-data"
    assert len(task.train) == 6


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loaders_module, "hub_reachable", lambda: False)
    with pytest.raises(DataError, match="could not reach the Hugging Face Hub") as error:
        load("someone/some-data")
    assert "no local path 'someone/some-data' exists; pass a local dataset folder" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("nonsense", "unknown task 'nonsense': use a built-in task"),
        ("missing/deeper/data", "no such file or folder: missing/deeper/data"),
        ("missing.jsonl", "no such file or folder: missing.jsonl"),
        ("./missing", "no such file or folder: ./missing"),
    ],
)
def test_unresolvable_task_names(task: str, message: str) -> None:
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        load(task)


def test_missing_field_names_it_lists_fields_and_the_option(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "response": "y", "label": "a"}] * 4)
    with pytest.raises(DataError, match="no prompt field") as error:
        load(path)
    assert "'prompt' or 'prompts'" in str(error.value)
    assert "text, response, label" in str(error.value)
    assert "--prompt-field" in str(error.value)
    with pytest.raises(DataError, match=r"no label field 'cls'.*--label-field"):
        load(path, prompt_field="text", label_field="cls")
    with pytest.raises(DataError, match=r"no id field 'uid'.*--id-field"):
        load(path, prompt_field="text", id_field="uid")


def test_duplicate_ids_are_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{**r, "id": "same"} for r in rows(6)])
    with pytest.raises(DataError, match="duplicate example id"):
        load(path)


def test_test_split_missing_a_field(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(4))
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "p", "label": "a"}])
    with pytest.raises(DataError, match="test split has no field 'response'"):
        load(tmp_path)


def test_row_without_a_value(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*rows(4), {"prompt": "p", "response": None, "label": "a"}])
    with pytest.raises(DataError, match="row 4 has no value for field 'response'"):
        load(path)


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load(path)
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        load(path)


def test_empty_data_is_an_error(tmp_path: Path) -> None:
    for name in ("empty.jsonl", "empty.csv"):
        (tmp_path / name).touch()
        with pytest.raises(DataError, match="the dataset is empty"):
            load(tmp_path / name)
    write_jsonl(tmp_path / "train.jsonl", rows(4))
    (tmp_path / "test.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="'test' split is empty"):
        load(tmp_path)


def test_one_training_class_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", rows(10, labels="a"))
    with pytest.raises(DataError, match=r"1 class\(es\).*at least 2"):
        load(path)
    with pytest.raises(DataError, match="after --train-limit 1"):
        load("grammars", train_limit=1)


def test_one_class_test_split_is_allowed(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(4))
    write_jsonl(tmp_path / "test.jsonl", rows(3, labels="b"))
    assert load(tmp_path).test[0].label == "b"


def test_unsupported_file_and_missing_split(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load(tmp_path / "data.txt")
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows(4))}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"no split 'train' .*validation.*--train-split"):
        load(tmp_path / "dd")


def test_folder_without_data(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="cannot read dataset folder"):
        load(tmp_path / "nothing")
