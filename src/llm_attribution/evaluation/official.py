"""Read the score matrices that the study's official code wrote (its ``cache/*.csv``).

The files hold the official "influence" ``-(ihvp . g_train)``: LOWER = MORE influential. A header row
lists training indices; each following row is one test example (in test-split order), optionally led
by its row index (pandas writes ``index_label=False`` files that way), then one value per training
example. :func:`read_official_scores` returns our convention (negated: HIGHER = more supportive) in
float64, so that rounding never creates ties the official ranking did not have.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError


def _parse_index(cell: str, path: Path, line: int, what: str) -> int:
    try:
        value = float(cell)
    except ValueError:
        raise DataError(f"{path}:{line}: {what} {cell!r} is not a number") from None
    if not value.is_integer():
        raise DataError(f"{path}:{line}: {what} {cell!r} is not an integer index")
    return int(value)


def _parse_row(cells: list[str], path: Path, line: int) -> np.ndarray:
    try:
        return np.array([float(cell) for cell in cells], dtype=np.float64)
    except ValueError:
        for column, cell in enumerate(cells, start=1):
            try:
                float(cell)
            except ValueError:
                raise DataError(f"{path}:{line}: value {cell!r} in column {column} is not a number") from None
        raise


def read_official_scores(path: str | Path) -> torch.Tensor:
    """The official CSV at ``path`` as a float64 ``[n_test, n_train]`` score matrix in OUR convention:
    HIGHER = the training example supports the test output more (the official values negated).

    Raises :class:`DataError` naming the file and line for an empty file, non-numeric cells, ragged
    rows, or a header that is not a permutation of ``0..n_train-1`` (columns are put in index order).
    """
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = [(number, row) for number, row in enumerate(csv.reader(handle), start=1) if row]
    except OSError as error:
        raise DataError(f"cannot read official scores {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    if not rows:
        raise DataError(f"{path}: empty file; expected a header row of training indices")
    header_line, header = rows[0]
    columns = [_parse_index(cell, path, header_line, "header cell") for cell in header]
    n_train = len(columns)
    if sorted(columns) != list(range(n_train)):
        raise DataError(f"{path}:{header_line}: header must list training indices 0..{n_train - 1}")
    if len(rows) == 1:
        raise DataError(f"{path}: no test rows after the header")
    width = len(rows[1][1])
    if width not in (n_train, n_train + 1):
        raise DataError(
            f"{path}:{rows[1][0]}: {width} cells, expected {n_train} (one per training index) "
            f"or {n_train + 1} (row index first)"
        )
    has_index = width == n_train + 1
    values = np.empty((len(rows) - 1, n_train), dtype=np.float64)
    for position, (line, cells) in enumerate(rows[1:]):
        if len(cells) != width:
            raise DataError(f"{path}:{line}: {len(cells)} cells, other rows have {width}")
        if has_index:
            index = _parse_index(cells[0], path, line, "row index")
            if index != position:
                raise DataError(f"{path}:{line}: row index {index}, expected {position} (test-split order)")
            cells = cells[1:]
        values[position, columns] = _parse_row(cells, path, line)
    return torch.from_numpy(-values)
