"""``llm-attr trace``: which training examples made the model give ITS OWN answers to a file of prompts?

The run's model answers every prompt (greedy, in batches); the behaviour judge labels each answer by the
training responses it resembles (a trigger's target, a refusal, a class); answers of the ``--flag`` label
are kept (all, without it); each method scores the run's training examples against every kept answer.
Per answer: the top training examples. Over all kept answers: the share of training examples of the
flagged label among each answer's top-k (the protocol of RepT and of backdoor tracing: how much of what a
method blames is the planted data), and the training examples ranked by their total support for the
kept answers: the list a user would review or remove. Per method and kept answer, the trust verdict
(``evaluation.trust``), as a run keeps one per test example. Scores: higher = supports the answer more.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..attribution.base import ReplayMethod
from ..core.errors import DataError
from ..core.settings import REQUIRED, option, require, require_positive
from ..core.storage import write_json_atomic
from ..data.chat import is_chat, query_example
from ..data.schema import Example
from ..diagnostics.behaviour import judge_labels
from ..evaluation.trust import trust_readings
from ..models.generate import generate_answers
from ..scoring.engine import stream_scores
from .attribute import STUDY_METHODS, AttributeSettings
from .explain import answer_features, answer_rendering
from .features import by_trajectory, features_for, is_replay
from .layout import TRACES_DIR
from .replay import open_replay
from .runs import LoadedRun, open_run

PROMPT_FIELDS = ("prompt", "prompts")


@dataclass(frozen=True)
class TraceSettings:
    """The prompts to answer, which answers to keep, and how many training examples to show."""

    prompts: str = option(
        REQUIRED, "file of prompts: .txt (one per line), .jsonl or .csv with a prompt field"
    )
    methods: tuple[str, ...] = option(STUDY_METHODS, "comma-separated methods")
    flag: str | None = option(
        None, "keep only answers the behaviour judge labels so (e.g. trigger); unset: keep every answer"
    )
    top: int = option(10, "top training examples per answer, and the k of the flagged share")
    max_new_tokens: int = option(48, "tokens generated per answer")
    generation_batch_size: int = option(8, "prompts answered per batched generation")

    def __post_init__(self) -> None:
        AttributeSettings(methods=self.methods)  # attribution's own checks of the methods
        require_positive("top", self.top)
        require_positive("max_new_tokens", self.max_new_tokens)
        require_positive("generation_batch_size", self.generation_batch_size)


@dataclass
class Trace:
    """The answers, which were kept, and per method the rankings, flagged shares and total support."""

    prompts: list[str]
    answers: list[str]
    judged: list[str | None]
    kept: list[int]  # indices of the kept answers
    flag: str | None
    top: dict[str, list[list[dict[str, Any]]]]  # method -> per kept answer -> top training examples
    flagged_share: dict[str, float | None]  # method -> mean share of flagged-label examples in the top-k
    support: dict[str, list[dict[str, Any]]]  # method -> training examples by total support, best first
    # method -> each kept answer's verdict and its signals, as results.json keeps them per test example
    trust: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"convention": "higher score = the training example supports the answer more", **vars(self)}


def read_prompts(path: Path) -> list[str]:
    """The prompts of a .txt (one per non-empty line), .jsonl or .csv file (a ``prompt`` or ``prompts``
    field, or a chat's last user turn under ``messages``)."""
    if not path.is_file():
        raise DataError(f"--prompts {path}: no such file")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix in (".jsonl", ".csv"):
        rows: list[dict[str, Any]]
        if path.suffix == ".csv":
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        else:
            try:
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            except ValueError as exc:
                raise DataError(f"--prompts {path}: not JSON lines ({exc})") from None
        prompts = [_prompt_of(row, path, index) for index, row in enumerate(rows)]
    else:
        raise DataError(f"--prompts {path}: give a .txt, .jsonl or .csv file")
    if not prompts:
        raise DataError(f"--prompts {path}: the file holds no prompt")
    return prompts


def _prompt_of(row: dict[str, Any], path: Path, index: int) -> str:
    for name in PROMPT_FIELDS:
        if row.get(name):
            return str(row[name])
    turns = row.get("messages")
    if isinstance(turns, list):
        users = [m.get("content") for m in turns if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    raise DataError(f"--prompts {path}: row {index} has no prompt field (prompt, prompts or messages)")


def trace(run: Path, settings: TraceSettings) -> Trace:
    """Answer every prompt, keep the flagged answers, and attribute them with every method."""
    prompts = read_prompts(Path(settings.prompts))
    loaded_run = open_run(run)
    train = loaded_run.task.train
    if settings.flag is not None:
        require(
            settings.flag in {e.label for e in train},
            f"--flag {settings.flag}: no training example has that label "
            f"(labels: {', '.join(sorted({e.label for e in train}))})",
        )
    chat = is_chat(train)
    answers = generate_answers(
        loaded_run.model,
        loaded_run.tokenizer,
        prompts,
        answer_rendering(loaded_run),
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.generation_batch_size,
    )
    judged = judge_labels(answers, train)
    kept = [i for i, label in enumerate(judged) if settings.flag is None or label == settings.flag]
    queries = [query_example(f"answer-{i}", prompts[i], answers[i], judged[i] or "?", chat) for i in kept]
    scores = _score(loaded_run, settings.methods, queries) if queries else {}
    top, share, support = {}, {}, {}
    labels = [e.label for e in train]
    k = min(settings.top, len(train))
    for name, matrix in scores.items():
        order = torch.argsort(matrix.double(), dim=1, descending=True, stable=True)[:, :k]
        top[name] = [
            [_entry(train[j], float(matrix[row, j])) for j in order[row].tolist()] for row in range(len(kept))
        ]
        share[name] = (
            None
            if settings.flag is None
            else float(sum(labels[j] == settings.flag for j in order.flatten().tolist()) / order.numel())
        )
        total = matrix.double().sum(dim=0)
        ranked = torch.argsort(total, descending=True, stable=True)[:k]
        support[name] = [_entry(train[j], float(total[j])) for j in ranked.tolist()]
    trust = trust_readings(scores) if scores else {}
    result = Trace(prompts, answers, judged, kept, settings.flag, top, share, support, trust)
    _keep(run, result, settings)
    return result


def _score(
    loaded_run: LoadedRun, methods: tuple[str, ...], queries: list[Example]
) -> dict[str, torch.Tensor]:
    """Every method's ``[n_queries, n_train]`` scores of the queries, as ``explain`` computes one."""
    attribute = AttributeSettings(methods=methods)
    features = answer_features(loaded_run, attribute)
    found: dict[str, torch.Tensor] = {}
    for group in by_trajectory(attribute.build_methods()):
        if is_replay(group):
            replay = open_replay(loaded_run)
            for name, method in group.items():
                found[name] = typing.cast(ReplayMethod, method).score_replay(replay, queries)
            continue
        used = features_for(features, group)
        train = used.stream("train")
        test = used.collect(queries, desc="answers")
        for name, method in group.items():
            found[name] = stream_scores(method, train, test)
    return {name: found[name] for name in attribute.methods}


def _entry(example: Example, score: float) -> dict[str, Any]:
    return {"id": example.id, "label": example.label, "score": score, "prompt": example.prompt}


def _keep(run: Path, result: Trace, settings: TraceSettings) -> Path:
    identity = json.dumps([dataclasses.asdict(settings), result.prompts])
    path = run / TRACES_DIR / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    write_json_atomic(path, result.to_dict())
    return path


def format_trace(result: Trace, width: int = 80) -> str:
    """Per method: the flagged share and the training examples with the most total support."""
    kept = len(result.kept)
    which = f"judged {result.flag!r}" if result.flag else "all"
    lines = [f"{len(result.prompts)} prompts answered; {kept} answers kept ({which})"]
    for name, ranked in result.support.items():
        share = result.flagged_share[name]
        said = (
            ""
            if share is None
            else f"; share of {result.flag!r} examples in each top-{len(result.top[name][0])}: {share:.3f}"
        )
        lines += ["", f"{name}: training examples by total support of the kept answers{said}"]
        lines.append(f"{'rank':>4}  {'support':>10}  {'label':<14}  training example")
        for rank, entry in enumerate(ranked, start=1):
            text = " ".join(entry["prompt"].split())
            text = text if len(text) <= width else text[: width - 3] + "..."
            lines.append(f"{rank:>4}  {entry['score']:>10.4g}  {entry['label'][:14]:<14}  {text}")
    return "\n".join(lines)
