"""Read a score matrix from a file, in our convention (HIGHER = more supportive) or the study's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..core.errors import DataError
from .official import read_official_scores

FORMATS = ("ours", "official")


def read_scores(path: str | Path, fmt: str = "ours") -> torch.Tensor:
    """``[n_test, n_train]`` scores, HIGHER = the training example supports the test output more.

    ``ours``: a run's ``scores/<method>.safetensors``, a ``.npy`` file, or a headerless numeric CSV, all
    already in our convention. ``official``: the study's CSV (header of training indices, lower = more
    influential), negated on reading.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such scores file: {path}")
    if fmt == "official":
        return read_official_scores(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            tensors = load_file(str(path))
            if "scores" not in tensors:
                raise DataError(f"{path}: no 'scores' tensor (it has {', '.join(tensors)})")
            return tensors["scores"]
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == ".csv":
            return torch.from_numpy(np.loadtxt(path, delimiter=",", ndmin=2))
    except (SafetensorError, ValueError, OSError) as exc:
        raise DataError(f"cannot read scores {path}: {str(exc).splitlines()[0]}") from None
    raise DataError(f"{path}: unsupported scores file type {suffix!r} (use .safetensors, .npy or .csv)")


def check_score_shape(scores: torch.Tensor, n_test: int, n_train: int, source: str | Path) -> None:
    """Raise :class:`DataError` unless ``scores`` is ``n_test x n_train`` (``source`` names the file)."""
    shape = tuple(scores.shape)
    if shape != (n_test, n_train):
        raise DataError(
            f"{source}: score matrix has shape {shape}, "
            f"but the dataset has {n_test} test and {n_train} training examples"
        )
