"""Resolve ``--task`` to a :class:`TaskData`: built-in tasks, dataset folders, files, or hub ids.

Every source is reduced to rows (dicts) per split, then mapped to :class:`Example` through the field
settings, checked (non-empty, at least two training classes), and subsampled. Anything the user can fix
(a wrong path, a missing field, a malformed line, no network) becomes one :class:`DataError` line that
says what to do, never a traceback. ``datasets`` is imported lazily: built-in tasks do not need it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import DataError
from ..core.hub import HUB_PROBE_TIMEOUT_S, hub_reachable
from .builtin import BUILTIN_TASKS
from .fields import columns_of, require_fields, resolve_fields, to_examples
from .schema import Example, TaskData
from .settings import DataSettings
from .subsample import split_train_test, subsample

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

Row = Mapping[str, Any]
_FILE_SUFFIXES = (".jsonl", ".csv")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_UNKNOWN_TASK = (
    "unknown task '{}': use a built-in task (grammars, math, backdoor), a dataset folder, "
    "a .jsonl/.csv file, or a hub dataset id"
)


@dataclass(frozen=True)
class RawSplits:
    """Rows read from a source, before field mapping; ``test=None`` means "split train by fraction"."""

    name: str
    source: str
    train: Sequence[Row]
    test: Sequence[Row] | None


def load_task(settings: DataSettings) -> TaskData:
    """The task ``settings.task`` names, field-mapped, checked, and subsampled to the set limits."""
    if settings.task in BUILTIN_TASKS:
        task = BUILTIN_TASKS[settings.task](settings.data_seed)
    else:
        task = _task_from_rows(_read_source(settings), settings)
    _require_two_classes(task.train, f"task '{task.name}'", "")
    limited = TaskData(
        name=task.name,
        train=subsample(task.train, settings.train_limit, settings.data_seed),
        test=subsample(task.test, settings.test_limit, settings.data_seed),
    )
    _require_two_classes(limited.train, f"task '{task.name}'", f" after --train-limit {settings.train_limit}")
    logger.info(
        "task %s: %d train, %d test examples, %d classes",
        limited.name,
        len(limited.train),
        len(limited.test),
        len(limited.labels),
    )
    return limited


def _task_from_rows(raw: RawSplits, settings: DataSettings) -> TaskData:
    """Map a source's rows to examples, holding out a seeded stratified test split if it has none.

    Generated ids index the rows as read, before any split or subsample, so they stay stable; rows of
    a single-split source are named ``row-<index>``.
    """
    if not raw.train:
        raise DataError(f"{raw.source}: the dataset is empty (no rows in '{settings.train_split}')")
    fields = resolve_fields(columns_of(raw.train), settings, raw.source)
    if raw.test is None:
        rows = to_examples(raw.train, fields, "row", raw.source)
        train, test = split_train_test(rows, settings.test_fraction, settings.data_seed)
    else:
        if not raw.test:
            raise DataError(f"{raw.source}: the '{settings.test_split}' split is empty")
        require_fields(fields, columns_of(raw.test), settings.test_split, raw.source)
        train = to_examples(raw.train, fields, settings.train_split, raw.source)
        test = to_examples(raw.test, fields, settings.test_split, raw.source)
    return TaskData(name=raw.name, train=train, test=test)


def _require_two_classes(train: Sequence[Example], what: str, context: str) -> None:
    """Attribution coverage is judged across classes, so training data with one class is unusable."""
    labels = sorted({e.label for e in train})
    if len(labels) < 2:
        raise DataError(
            f"{what}: the training split has {len(labels)} class(es){context} ({', '.join(labels)}); "
            "attribution needs at least 2 (check --label-field)"
        )


def _read_source(settings: DataSettings) -> RawSplits:
    """Rows of the folder, file or hub dataset that ``settings.task`` names."""
    task = settings.task
    path = Path(task).expanduser()
    if path.is_dir():
        return _read_folder(path, settings)
    if path.is_file():
        if path.suffix.lower() not in _FILE_SUFFIXES:
            raise DataError(
                f"unsupported file type '{path.suffix}' for {task}: use a .jsonl or .csv file, "
                "or a dataset folder"
            )
        return RawSplits(path.stem, task, _read_rows(path), None)
    if _looks_like_path(task):
        raise DataError(f"no such file or folder: {task}")
    if _HUB_ID.fullmatch(task):
        return _splits_from_hf(load_hub_dataset(task), task, task, settings)
    raise DataError(_UNKNOWN_TASK.format(task))


def _looks_like_path(task: str) -> bool:
    """Whether ``task`` was meant as a path (so a missing one is reported as such, not sent to the hub)."""
    separators = [s for s in (os.sep, os.altsep) if s]
    return (
        task.lower().endswith(_FILE_SUFFIXES)
        or task.startswith((".", "~", *separators))
        or (any(s in task for s in separators) and not _HUB_ID.fullmatch(task))
    )


def _read_folder(path: Path, settings: DataSettings) -> RawSplits:
    """A ``save_to_disk`` folder, a folder of ``<split>.jsonl``/``<split>.csv`` files, or data files."""
    if any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json")):
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises many types for unreadable folders
            raise DataError(f"cannot read dataset folder {path}: {_one_line(err)}") from err
        return _splits_from_hf(loaded, path.name, str(path), settings)
    for suffix in _FILE_SUFFIXES:
        train_file, test_file = (path / f"{s}{suffix}" for s in (settings.train_split, settings.test_split))
        if train_file.is_file():
            test = _read_rows(test_file) if test_file.is_file() else None
            return RawSplits(path.name, str(path), _read_rows(train_file), test)
    return _splits_from_hf(load_hub_dataset(str(path)), path.name, str(path), settings)


def _splits_from_hf(
    loaded: datasets.Dataset | datasets.DatasetDict, name: str, source: str, settings: DataSettings
) -> RawSplits:
    """Rows of a Hugging Face dataset: its train/test splits, or one dataset to be split by fraction."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return RawSplits(name, source, loaded.to_list(), None)
    if settings.train_split not in loaded:
        raise DataError(
            f"{source} has no split '{settings.train_split}' (it has: {', '.join(loaded)}); "
            "choose one with --train-split"
        )
    test = loaded[settings.test_split].to_list() if settings.test_split in loaded else None
    if test is None:
        logger.info(
            "%s has no split '%s': holding out --test-fraction of '%s'",
            source,
            settings.test_split,
            settings.train_split,
        )
    return RawSplits(name, source, loaded[settings.train_split].to_list(), test)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` or ``.csv`` file, with read and decode errors turned into DataError."""
    try:
        if path.suffix.lower() == ".csv":
            return _read_csv(path)
        return _read_jsonl(path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {path}: {_one_line(err)}") from err


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header; a row with more cells than the header is reported by line."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = []
        for row in reader:
            if None in row:  # DictReader files surplus cells under the key None
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(reader.fieldnames or []) + len(row[None])} cells, "
                    f"but the header names {len(reader.fieldnames or [])}"
                )
            rows.append(row)
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per non-blank line; a bad line is reported by file and line number."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {line_number}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                kind = type(row).__name__
                raise DataError(f"{path}, line {line_number}: expected a JSON object, got {kind}")
            rows.append(row)
    return rows


def load_hub_dataset(id_or_path: str, cache_dir: str | Path | None = None) -> datasets.DatasetDict:
    """``datasets.load_dataset(id_or_path)``, failing fast with one DataError line when it cannot.

    Works for hub ids and for local folders of data files. Before going online it checks within a few
    seconds that the hub answers at all, because ``datasets`` otherwise retries for about half a minute.
    """
    import datasets

    local = Path(id_or_path).expanduser().exists()
    reachable = local or datasets.config.HF_HUB_OFFLINE or hub_reachable()
    try:
        if not reachable:
            raise ConnectionError(f"no answer within {HUB_PROBE_TIMEOUT_S:g} s")
        loaded = datasets.load_dataset(id_or_path, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # datasets and huggingface_hub raise many types; all mean "cannot load"
        raise DataError(_load_failure(id_or_path, err, local, bool(reachable))) from err
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{id_or_path}: expected a dataset with splits, got {type(loaded).__name__}")
    return loaded


def _load_failure(id_or_path: str, err: Exception, local: bool, reachable: bool) -> str:
    """The one-line message for a failed ``load_dataset`` call."""
    reason = _one_line(err)
    if local:
        return f"cannot read dataset folder {id_or_path} with datasets.load_dataset: {reason}"
    advice = f"no local path '{id_or_path}' exists; pass a local dataset folder or a .jsonl/.csv file instead"
    if not reachable or isinstance(err, ConnectionError | TimeoutError):
        return f"could not reach the Hugging Face Hub to load '{id_or_path}' ({reason}); {advice}"
    return f"could not load '{id_or_path}' from the Hugging Face Hub ({reason}); check the id, or {advice}"


def _one_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type name), at most 200 characters."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]
