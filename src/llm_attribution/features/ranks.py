"""Per-example work split over the ranks (processes) of a ``torchrun`` job, gathered back in example order.

(The feature store's on-disk pieces are *shards*; the pieces of work ranks do are *slices*.)

Gradient collection: each rank computes the features of its contiguous slice of the examples and every
rank receives all rows (rank 0 stores them; every rank scores with them). Scoring: each rank scores its
slice of the TEST examples against all training examples and the rows are gathered. Test rows are the
split that keeps every method exact: DataInf's damping and the exact inverse Fisher depend on ALL
training gradients, while each test row's scores depend on that test example alone.
Without ``torchrun`` both functions simply call the work on everything.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch

from ..core import distributed
from ..data.schema import Example
from .gradients import Features
from .kronecker import KroneckerFactors

_REPRESENTATIONS = "__representations__"
_LOSSES = "__losses__"
_REPRESENTATION_GRADIENTS = "__representation_gradients__"


def collect_on_ranks(
    examples: Sequence[Example], collect: Callable[[Sequence[Example]], Features]
) -> Features:
    """``collect(examples)``, each rank computing a contiguous slice; every rank gets all rows."""
    if not distributed.active():
        return collect(examples)
    rows = distributed.my_rows(len(examples))
    local: Features | None = None
    with distributed.agree():
        if rows.stop > rows.start:
            local = collect(examples[rows])
    described = None if local is None else (_layout(local), local.shapes)
    layout, shapes = next(item for item in distributed.all_gather_object(described) if item is not None)
    flat = distributed.all_gather_rows(None if local is None else _flatten(local, layout))
    gathered = _unflatten(flat, layout, [e.id for e in examples], shapes)
    gathered.texts = [e.text for e in examples]
    gathered.labels = [e.label for e in examples]
    return gathered


def factors_on_ranks(
    examples: Sequence[Example], accumulate: Callable[[Sequence[Example], KroneckerFactors], None]
) -> KroneckerFactors:
    """Kronecker factors of all ``examples``: each rank adds those of its contiguous slice
    (``accumulate(slice, into)``), and every rank gets the sum."""
    if not distributed.active():
        factors = KroneckerFactors()
        accumulate(examples, factors)
        return factors
    rows = distributed.my_rows(len(examples))
    local = KroneckerFactors()
    with distributed.agree():
        if rows.stop > rows.start:
            accumulate(examples[rows], local)
    return functools.reduce(KroneckerFactors.merged, distributed.all_gather_object(local))


def score_on_ranks(score: Callable[[Features], torch.Tensor], test: Features) -> torch.Tensor:
    """``score(test)`` (``[n_test, n_train]``), each rank scoring a contiguous slice of the test rows."""
    if not distributed.active():
        return score(test)
    rows = distributed.my_rows(len(test.ids))
    local: torch.Tensor | None = None
    with distributed.agree():
        if rows.stop > rows.start:
            local = score(slice_features(test, rows))
    return distributed.all_gather_rows(local)


def slice_features(features: Features, rows: slice) -> Features:
    """The features of rows ``rows`` (views, no copy); what is not per row (shapes, factors, learning
    rates, moments) kept as is."""
    reps, rep_grads = features.representations, features.representation_gradients
    return dataclasses.replace(
        features,
        ids=features.ids[rows],
        blocks={name: block[rows] for name, block in features.blocks.items()},
        representations=None if reps is None else reps[rows],
        losses=features.losses[rows],
        texts=None if features.texts is None else features.texts[rows],
        labels=None if features.labels is None else features.labels[rows],
        representation_gradients=None if rep_grads is None else rep_grads[rows],
    )


def _layout(features: Features | None) -> list[tuple[str, int]] | None:
    """Column layout of the flat row matrix: each block's width, then representations and the loss."""
    if features is None:
        return None
    layout = [(name, block.shape[1]) for name, block in features.blocks.items()]
    if features.representations is not None:
        layout.append((_REPRESENTATIONS, features.representations.shape[1]))
    if features.representation_gradients is not None:
        layout.append((_REPRESENTATION_GRADIENTS, features.representation_gradients.shape[1]))
    return [*layout, (_LOSSES, 1)]


def _flatten(features: Features, layout: list[tuple[str, int]]) -> torch.Tensor:
    columns = {**features.blocks, _LOSSES: features.losses[:, None]}
    if features.representations is not None:
        columns[_REPRESENTATIONS] = features.representations
    if features.representation_gradients is not None:
        columns[_REPRESENTATION_GRADIENTS] = features.representation_gradients
    return torch.cat([columns[name].float() for name, _ in layout], dim=1)


def _unflatten(
    flat: torch.Tensor, layout: list[tuple[str, int]], ids: list[str], shapes: dict[str, tuple[int, int]]
) -> Features:
    parts = dict(
        zip(
            [name for name, _ in layout],
            torch.split(flat, [width for _, width in layout], dim=1),
            strict=True,
        )
    )
    reps = parts.pop(_REPRESENTATIONS, None)
    rep_grads = parts.pop(_REPRESENTATION_GRADIENTS, None)
    losses = parts.pop(_LOSSES)
    return Features(
        ids,
        {name: part.contiguous() for name, part in parts.items()},
        None if reps is None else reps.contiguous(),
        losses.flatten().contiguous(),
        dict(shapes),
        representation_gradients=None if rep_grads is None else rep_grads.contiguous(),
    )
