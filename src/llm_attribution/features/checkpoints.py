"""Features of several checkpoints side by side, for methods that sum over the training trajectory
(TracIn): each epoch's gradient blocks under ``epoch-<e>/<block>``, the losses, representations and texts
of the last epoch, and each epoch's mean learning rate.

Stacking the blocks, rather than giving such methods a loop of their own, keeps them inner-product
methods like every other: they score in memory, streamed, under torchrun and for one query unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..models.moments import OptimizerMoments
from .gradients import Features

PREFIX = "epoch-"


def checkpoint_block(epoch: int, name: str) -> str:
    """The name of block ``name`` of the checkpoint saved after ``epoch``."""
    return f"{PREFIX}{epoch}/{name}"


def block_epoch(name: str) -> int:
    """The epoch of a stacked block's name (ValueError for a block that is not stacked)."""
    head, sep, _ = name.partition("/")
    if not sep or not head.startswith(PREFIX) or not head[len(PREFIX) :].isdigit():
        raise ValueError(f"{name!r} is not a checkpoint block ({PREFIX}<epoch>/<block>)")
    return int(head[len(PREFIX) :])


def stack_checkpoints(per_epoch: Mapping[int, Features], learning_rates: Mapping[int, float]) -> Features:
    """One :class:`Features` holding every epoch's gradient blocks (rows: the same examples in the same
    order in each); everything else from the last epoch."""
    if not per_epoch:
        raise ValueError("no checkpoints to stack")
    epochs = sorted(per_epoch)
    last = per_epoch[epochs[-1]]
    for epoch in epochs:
        if per_epoch[epoch].ids != last.ids:
            raise ValueError(f"the features of epoch {epoch} are of other examples than epoch {epochs[-1]}'s")
    return Features(
        ids=last.ids,
        blocks={
            checkpoint_block(e, name): rows for e in epochs for name, rows in per_epoch[e].blocks.items()
        },
        representations=last.representations,
        losses=last.losses,
        shapes={
            checkpoint_block(e, name): shape for e in epochs for name, shape in per_epoch[e].shapes.items()
        },
        texts=last.texts,
        learning_rates={e: float(learning_rates[e]) for e in epochs},
        moments=stack_moments({e: per_epoch[e].moments for e in epochs}),
        representation_gradients=last.representation_gradients,
        labels=last.labels,
    )


def stack_moments(per_epoch: Mapping[int, OptimizerMoments | None]) -> OptimizerMoments | None:
    """Every epoch's optimizer moments under its stacked block names (None when an epoch has none)."""
    stacked: OptimizerMoments | None = None
    for epoch, moments in sorted(per_epoch.items()):
        if moments is None:
            return None
        renamed = moments.renamed({b: checkpoint_block(epoch, b) for b in moments.first})
        stacked = renamed if stacked is None else stacked.merged(renamed)
    return stacked
