"""Attribute a run: which methods with which options, then every method's score matrix and metrics in
``results.json``.

Scores follow one convention everywhere: HIGHER = the training example supports the test output MORE.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..attribution.base import Method
from ..attribution.registry import get_method, method_class
from ..core import distributed
from ..core.errors import ConfigError
from ..core.settings import base_type, field_types, option, require, require_positive
from ..core.storage import read_json, write_json_atomic
from ..core.versions import package_versions
from ..data.templates import PromptSettings
from ..evaluation.grid import SeedScores, judge_method, paired_differences, run_intervals
from ..evaluation.trust import trust_readings
from ..features.gradients import Features, GradientSettings
from ..models.settings import ModelSettings
from ..scoring.engine import MethodResult, ScoredMethods, ScoringJob, score_in_memory, score_streamed
from ..scoring.replayed import score_replayed
from ..scoring.store import ScoreStore
from ..scoring.train_features import TrainFeatures
from .features import RunFeatures, by_trajectory, features_for, is_replay
from .layout import RESULTS_FILE, SETTINGS_FILE, scores_dir
from .replay import open_replay
from .runs import LoadedRun

log = logging.getLogger(__name__)

STUDY_METHODS = ("hessian-free", "datainf", "lissa", "exact", "repsim")


@dataclass(frozen=True)
class AttributeSettings:
    """Which methods score the run, with which options, on which epoch's adapter."""

    methods: tuple[str, ...] = option(
        STUDY_METHODS, "comma-separated attribution methods (higher score = supports the test output more)"
    )
    method_options: tuple[str, ...] = option(
        (), "comma-separated method.option=value, e.g. lissa.depth=200,datainf.damping_scale=0.05"
    )
    epoch: int | None = option(None, "explain the adapter saved after this epoch (default: the last)")
    shard_size: int = option(256, "examples per stored feature shard (the unit a crashed run resumes from)")
    score_checkpoint_minutes: float = option(
        5.0,
        "keep a method's partial scores (its sum over the LoRA blocks done) at most this often, for resuming "
        "a killed run (0: after every block); results do not depend on it",
        recorded=False,
    )
    stream: bool = option(
        False,
        "score with the training features read from the store shard by shard and each score file written "
        "as it is computed: memory independent of n_train (one process; a killed run rescores the method "
        "it was in, not from its last LoRA block)",
    )

    def __post_init__(self) -> None:
        require(len(self.methods) > 0, "--methods must name at least one method")
        require(len(set(self.methods)) == len(self.methods), "--methods lists a method twice")
        for name in self.methods:
            method_class(name)  # unknown names fail here, before any work
        parse_method_options(self.methods, self.method_options)
        require_positive("shard_size", self.shard_size)
        require(
            self.score_checkpoint_minutes >= 0 and self.score_checkpoint_minutes != float("inf"),
            f"--score-checkpoint-minutes must be >= 0, got {self.score_checkpoint_minutes!r}",
        )
        if self.epoch is not None:
            require_positive("epoch", self.epoch)

    def build_methods(self) -> dict[str, Method]:
        options = parse_method_options(self.methods, self.method_options)
        return {name: get_method(name, **options.get(name, {})) for name in self.methods}

    @property
    def needs_kronecker(self) -> bool:
        """Whether any method asked for scores with the training split's token-level Kronecker factors."""
        return any(method_class(name).needs_kronecker for name in self.methods)


def parse_method_options(methods: Sequence[str], items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["lissa.depth=200"]`` -> ``{"lissa": {"depth": 200}}``, typed by the method's settings."""
    parsed: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        name, dot, field = key.strip().rpartition(".")
        if not sep or not dot:
            raise ConfigError(f"--method-options: expected method.option=value, got {item!r}")
        if name not in methods:
            raise ConfigError(f"--method-options: {name!r} is not among --methods ({', '.join(methods)})")
        settings_cls = method_class(name).Settings
        hints = field_types(settings_cls)
        if field not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(settings_cls))
            raise ConfigError(f"--method-options: {name} has no option {field!r}; its options: {known}")
        parsed.setdefault(name, {})[field] = _typed(text.strip(), hints[field], item)
    return parsed


def _typed(text: str, hint: Any, item: str) -> Any:
    inner, optional = base_type(hint)
    if optional and text.lower() == "none":
        return None
    try:
        if inner is bool:
            return text.lower() in ("1", "true", "yes", "on")
        return inner(text) if inner in (int, float, str) else text
    except ValueError:
        kind = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"--method-options: {item!r} needs a {kind} value") from None


def attribute_run(
    loaded_run: LoadedRun,
    settings: AttributeSettings,
    prompt: PromptSettings,
    gradients: GradientSettings,
    model_settings: ModelSettings,
) -> dict[str, Any]:
    """Collect (or reuse) features of ``loaded_run``, score every method, write scores and ``results.json``.

    Returns the results dict; methods scored before (by another call) are kept unless re-scored.
    """
    run, task = loaded_run.run, loaded_run.task
    features = RunFeatures(
        loaded_run, prompt, gradients, model_settings, settings.shard_size, settings.needs_kronecker
    )
    timings: dict[str, float] = {}
    if settings.stream and distributed.active():
        log.warning("--stream scores in one process; under torchrun the ranks score test rows in memory")
    results: dict[str, MethodResult] = {}
    ihvp: dict[str, Any] = {}
    for group in by_trajectory(settings.build_methods()):
        job = _job(group, features_for(features, group), loaded_run, settings)
        if is_replay(group):  # MAGIC: the run replayed, no features read
            scored, compared = score_replayed(job, functools.partial(open_replay, loaded_run), task.test)
        else:
            scored, compared = _score(job, features_for(features, group), settings.stream, timings)
        results.update(scored)
        ihvp.update(compared)
    results = {name: results[name] for name in settings.methods}  # in the order asked for
    adapter_sha256 = features.identity["adapter_sha256"]
    path = run / RESULTS_FILE
    record = read_json(path) if path.is_file() else {"methods": {}}
    if record.get("adapter_sha256") != adapter_sha256:
        record = {"methods": {}}  # scores of another adapter (epoch) must not be mixed in
    for name, result in results.items():
        record["methods"][name] = {
            "accuracy": result.metrics.accuracy,
            "coverage": result.metrics.coverage,
            "k": result.metrics.k,
            "seconds": result.seconds,
            "settings": result.settings,
            "scores": str(result.path.relative_to(run)),
        }
        notes = job.store.notes(name)
        if notes:
            record["methods"][name]["notes"] = notes
        if name in ihvp:
            compared = ihvp[name]
            if name != "exact":
                record["methods"][name]["ihvp_relative_error_vs_exact"] = compared["relative_error"]
                if "relative_error_in_span" in compared:  # absent from a comparison stored before it existed
                    # only the part inside the training-gradient span can change a score
                    record["methods"][name]["ihvp_relative_error_vs_exact_in_span"] = compared[
                        "relative_error_in_span"
                    ]
            record["methods"][name]["ihvp_cosine"] = {
                "vs_exact": compared["cosine_vs_exact"],
                "vs_gradient": compared["cosine_vs_gradient"],
                **(
                    {"vs_exact_in_span": compared["cosine_vs_exact_in_span"]}
                    if "cosine_vs_exact_in_span" in compared
                    else {}
                ),
            }
    if distributed.is_main():  # only rank 0 writes the record, and only it has finished writing the scores
        _judge_stored(record, job)
    record.update(
        {
            "convention": "higher score = the training example supports the test output more",
            "task": task.name,
            "n_train": len(task.train),
            "n_test": len(task.test),
            "n_classes": len(task.labels),
            "adapter": str(loaded_run.adapter),
            "adapter_sha256": adapter_sha256,
            "epoch": loaded_run.epoch,
            "timings": timings,
            "settings": read_json(run / SETTINGS_FILE),
            "versions": package_versions(),
        }
    )
    distributed.on_main(write_json_atomic, path, record)
    return record


def _job(
    methods: dict[str, Method], features: RunFeatures, loaded_run: LoadedRun, settings: AttributeSettings
) -> ScoringJob:
    task = loaded_run.task
    return ScoringJob(
        methods=methods,
        store=ScoreStore(scores_dir(loaded_run.run)),
        features_key=features.keys(),
        train_ids=[e.id for e in task.train],
        test_ids=[e.id for e in task.test],
        train_labels=[e.label for e in task.train],
        test_labels=[e.label for e in task.test],
        checkpoint_minutes=settings.score_checkpoint_minutes,
    )


def _score(job: ScoringJob, features: RunFeatures, stream: bool, timings: dict[str, float]) -> ScoredMethods:
    """The job's methods scored in memory or streamed; the seconds the features took added to ``timings``
    (summed over the groups that loaded features)."""

    def add(measured: dict[str, float]) -> None:
        for key, seconds in measured.items():
            timings[key] = timings.get(key, 0.0) + seconds

    if stream and not distributed.active():

        def streamed() -> tuple[TrainFeatures, Features]:
            train, test, measured = features.streamed()
            add(measured)
            return train, test

        return score_streamed(job, streamed)

    def in_memory() -> tuple[Features, Features]:
        train, test, measured = features.in_memory()
        add(measured)
        return train, test

    return score_in_memory(job, in_memory)


def _judge_stored(record: dict[str, Any], job: ScoringJob) -> None:
    """Each stored method's intervals, the paired differences and the trust verdicts, into ``record``."""
    stored = {name: job.store.read(name) for name in record["methods"]}  # each file read once, checked
    judged = {
        name: judge_method([SeedScores(scores, job.train_labels, job.test_labels)])
        for name, scores in stored.items()
    }
    for name, metrics in judged.items():
        record["methods"][name]["intervals"] = run_intervals(metrics)
    record["paired"] = paired_differences(judged)
    for name, reading in trust_readings(stored).items():
        record["methods"][name]["trust"] = reading
