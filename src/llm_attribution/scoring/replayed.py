"""Scoring the methods that replay the fine-tuning run (MAGIC) instead of reading features.

Their scores go into the same :class:`~.store.ScoreStore` under the same kind of key (the run's features
key, the method's class and settings) and are judged as every other method's; under torchrun each rank
scores a contiguous slice of the test examples (a test example's metagradient does not depend on the
others) and rank 0 keeps the matrix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from ..attribution.base import ReplayMethod
from ..core import distributed
from ..core.errors import ConfigError
from ..data.schema import Example
from ..evaluation.metrics import evaluate
from ..features.replay import TrainingReplay
from .engine import ScoredMethods, ScoringJob

log = logging.getLogger(__name__)


def score_replayed(
    job: ScoringJob, load: Callable[[], TrainingReplay], test: Sequence[Example]
) -> ScoredMethods:
    """Every (replay) method of ``job`` on the ``test`` examples; ``load`` is called only when some
    scores are not in the store."""
    store = job.store
    cached = {name: store.cached(name, job.key(name)) for name in job.methods}
    replay = load() if any(hit is None for hit in cached.values()) else None
    results = {}
    for name, method in job.methods.items():
        if not isinstance(method, ReplayMethod):
            raise ConfigError(f"{name} does not replay the fine-tuning run")
        hit = cached[name]
        if hit is None:
            assert replay is not None
            start = time.perf_counter()
            scores = _on_ranks(method, replay, test)
            seconds = time.perf_counter() - start
            job.keep(name, scores, seconds)
        else:
            scores, seconds = hit
        metrics = evaluate(scores, job.train_labels, job.test_labels)
        results[name] = job.result(name, scores, metrics, seconds)
    return results, {}


def _on_ranks(method: ReplayMethod, replay: TrainingReplay, test: Sequence[Example]) -> torch.Tensor:
    """``[n_test, n_train]`` scores, each torchrun rank scoring a contiguous slice of the test examples."""
    if not distributed.active():
        return method.score_replay(replay, test)
    rows = distributed.my_rows(len(test))
    local: torch.Tensor | None = None
    with distributed.agree():
        if rows.stop > rows.start:
            local = method.score_replay(replay, list(test)[rows])
    return distributed.all_gather_rows(local)
