"""Map raw rows (dicts from any source) to :class:`Example`, through the field settings.

Sources name their columns differently (the study uses ``prompts``/``variation``, most data uses
``prompt``/``label``), so ``auto`` picks the first name present and anything else must be mapped
explicitly; a missing field names the fields the data has and the option that maps it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.errors import DataError
from .chat import parse_messages, split_conversation
from .schema import Example
from .settings import DataSettings

Row = Mapping[str, Any]

# role -> names tried, in order, when the field setting is "auto"
AUTO_NAMES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "prompts"),
    "response": ("response",),
    "label": ("label", "variation"),
    "id": ("id",),
}
MESSAGES = "messages"  # the column of chat-format data (a list of {role, content} per example)


@dataclass(frozen=True)
class Fields:
    """Resolved column names; ``id=None`` means ids are generated as ``<split>-<index>``. Chat-format data
    has ``messages`` (its column) and no prompt or response columns (both empty)."""

    prompt: str
    response: str
    label: str
    id: str | None
    messages: str | None = None


def columns_of(rows: Sequence[Row]) -> list[str]:
    """Every key of any row, in first-seen order (JSONL rows need not share their keys)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def resolve_fields(columns: Sequence[str], settings: DataSettings, source: str) -> Fields:
    """Column names for prompt, response, label and id, from the settings and the data's columns; data
    with a ``messages`` column and no prompt column is chat-format."""
    if MESSAGES in columns and settings.prompt_field == "auto" and _find("prompt", "auto", columns) is None:
        label = _required("label", settings, columns, source)
        id_name = _find("id", settings.id_field, columns)
        if id_name is None and settings.id_field != "auto":
            _required("id", settings, columns, source)
        return Fields(prompt="", response="", label=label, id=id_name, messages=MESSAGES)
    prompt, response, label = (
        _required(role, settings, columns, source) for role in ("prompt", "response", "label")
    )
    id_name = _find("id", settings.id_field, columns)
    if id_name is None and settings.id_field != "auto":
        _required("id", settings, columns, source)
    return Fields(prompt=prompt, response=response, label=label, id=id_name)


def _find(role: str, setting: str, columns: Sequence[str]) -> str | None:
    """The column a field setting names (``auto``: the first of the role's usual names present)."""
    candidates = AUTO_NAMES[role] if setting == "auto" else (setting,)
    return next((name for name in candidates if name in columns), None)


def _required(role: str, settings: DataSettings, columns: Sequence[str], source: str) -> str:
    """A field's column, or a DataError naming the field, the data's fields and the option to map it."""
    setting = getattr(settings, f"{role}_field")
    found = _find(role, setting, columns)
    if found is None:
        candidates = AUTO_NAMES[role] if setting == "auto" else (setting,)
        wanted = " or ".join(f"'{name}'" for name in candidates)
        # names shown as Python would write them when they hold a line break or are blank: one line
        shown = [name if name.isprintable() and name.strip() else repr(name) for name in columns]
        raise DataError(
            f"{source}: no {role} field {wanted} (the data has: {', '.join(shown) or 'no fields'}); "
            f"map it with --{role}-field"
        )
    return found


def require_fields(fields: Fields, columns: Sequence[str], split: str, source: str) -> None:
    """Fail unless a split (typically test) has every field resolved on the training split."""
    named = (fields.prompt, fields.response, fields.label, fields.id, fields.messages)
    missing = [name for name in named if name]
    missing = [name for name in missing if name not in columns]
    if missing:
        raise DataError(
            f"{source}: the {split} split has no field '{missing[0]}' (it has: {', '.join(columns)}); "
            "its fields must match the training split's"
        )


def to_examples(rows: Sequence[Row], fields: Fields, split: str, source: str) -> tuple[Example, ...]:
    """Examples of one split; values become ``str`` and generated ids use the row's original index."""
    examples = []
    for index, row in enumerate(rows):
        if fields.messages:
            examples.append(_chat_example(row, fields, split, index, source))
            continue
        prompt, response, label = (
            _value(row, name, split, index, source) for name in (fields.prompt, fields.response, fields.label)
        )
        example_id = _value(row, fields.id, split, index, source) if fields.id else f"{split}-{index}"
        examples.append(Example(id=example_id, prompt=prompt, response=response, label=label))
    # Checked before any split: two rows of one file with one id would otherwise land in train and test.
    counts = Counter(e.id for e in examples)
    dupes = [i for i, c in counts.items() if c > 1]
    if dupes:
        raise DataError(f"{source}: duplicate example id(s) in {split}: {', '.join(dupes[:5])}")
    return tuple(examples)


def _chat_example(row: Row, fields: Fields, split: str, index: int, source: str) -> Example:
    assert fields.messages is not None
    label = _value(row, fields.label, split, index, source)
    example_id = _value(row, fields.id, split, index, source) if fields.id else f"{split}-{index}"
    messages = parse_messages(row.get(fields.messages), f"{source}: {split} example {example_id}")
    prompt, response = split_conversation(messages)
    return Example(id=example_id, prompt=prompt, response=response, label=label, messages=messages)


def _value(row: Row, name: str, split: str, index: int, source: str) -> str:
    value = row.get(name)
    if value is None:
        raise DataError(f"{source}: {split} row {index} has no value for field '{name}'")
    return str(value)
