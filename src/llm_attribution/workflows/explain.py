"""``llm-attr explain``: which training examples made the model answer THIS prompt that way?

For one new prompt (and the model's own greedy answer when no response is given), the gradient of that
answer's loss and its representation are computed with the run's fine-tuned model, and each method ranks
the run's training examples by how much they support the answer. HIGHER score = supports it more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attribution.base import ReplayMethod, RepresentationMethod
from ..core.settings import REQUIRED, option, require, require_positive
from ..core.storage import write_json_atomic
from ..data.chat import is_chat, query_example
from ..data.schema import Example
from ..data.templates import PromptSettings
from ..evaluation.trust import shipped_trust_model, trust_k, trust_signals
from ..features.gradients import GradientSettings
from ..models.generate import generate_answers
from ..scoring.engine import stream_scores
from .attribute import STUDY_METHODS, AttributeSettings
from .features import RunFeatures, by_trajectory, features_for, is_replay
from .layout import explanation_file
from .replay import open_replay
from .runs import LoadedRun, open_run
from .training_tokens import TrainingTokens, score_training_tokens

QUERY_ID = "query"


@dataclass(frozen=True)
class Ranked:
    """One training example in a method's ranking for the query."""

    rank: int
    score: float
    id: str
    label: str
    prompt: str
    response: str


@dataclass(frozen=True)
class Trust:
    """How far one method's ranking for the query can be trusted, and what the verdict rests on."""

    verdict: str  # high / medium / low, or unknown (one method: nothing to agree with)
    agreement: float  # share of its top-k the other methods share
    margin: float  # (mean of its top-k - mean of all) / std of all
    predicted_lds: float
    k: int  # the top-k the signals look at
    calibrated: bool = True  # whether the calibration was fitted with this method among its methods


@dataclass(frozen=True)
class TokenShares:
    """Per-token attribution of one method: each labelled token of the query, and for each of its top
    training examples the token's share of that example's score (the shares sum to the score)."""

    tokens: list[str]
    in_response: list[bool]
    shares: dict[str, list[float]]  # training example id -> one share per token


@dataclass
class Explanation:
    """The query, the answer explained, each method's top training examples (best first) and its trust."""

    prompt: str
    response: str
    generated: bool
    top: dict[str, list[Ranked]]
    trust: dict[str, Trust] = dataclasses.field(default_factory=dict)
    tokens: dict[str, TokenShares] = dataclasses.field(default_factory=dict)  # with --tokens
    # with --tokens, for methods that score a training example's own tokens (RepT): method -> id -> tokens
    training_tokens: dict[str, dict[str, TrainingTokens]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "convention": "higher score = the training example supports the answer more",
            "prompt": self.prompt,
            "response": self.response,
            "generated": self.generated,
            "methods": {name: [r.__dict__ for r in rows] for name, rows in self.top.items()},
            "trust": {name: dataclasses.asdict(trust) for name, trust in self.trust.items()},
            "tokens": {name: dataclasses.asdict(shares) for name, shares in self.tokens.items()},
            "training_tokens": {
                name: {key: dataclasses.asdict(t) for key, t in found.items()}
                for name, found in self.training_tokens.items()
            },
        }


@dataclass(frozen=True)
class ExplainSettings:
    """The answer to explain and how many training examples each method shows."""

    prompt: str = option(REQUIRED, "the prompt to explain")
    response: str | None = option(None, "the answer to explain (default: the model's greedy answer)")
    methods: tuple[str, ...] = option(STUDY_METHODS, "comma-separated methods")
    top: int = option(10, "training examples shown per method")
    epoch: int | None = option(None, "the adapter of this epoch (default: the last)")
    max_new_tokens: int = option(48, "tokens generated for the model's own answer")
    tokens: bool = option(
        False,
        "also show which tokens of the answer carry each method's top training examples' scores (methods "
        "whose scores are linear in the test gradient), and for rept which tokens of each top training "
        "example match the answer",
    )

    def __post_init__(self) -> None:
        attribute = AttributeSettings(methods=self.methods, epoch=self.epoch)  # attribution's own checks
        require_positive("top", self.top)
        require_positive("max_new_tokens", self.max_new_tokens)
        labelled = [name for name, m in attribute.build_methods().items() if m.needs_labels]
        require(
            not labelled,
            f"{', '.join(labelled)} values training examples by the test example's class label, and a new "
            "answer has none: score it with llm-attr run or attribute",
        )
        if self.tokens:
            other = [
                name
                for name, m in attribute.build_methods().items()
                if not m.token_additive and not getattr(m, "training_token_scores", False)
            ]
            require(
                not other,
                "--tokens needs methods whose scores are linear in the test gradient (or rept, which scores "
                f"training tokens), and {', '.join(other)} are not (cosines, preconditioned rows, "
                "representations, text)",
            )


def explain(run: Path, settings: ExplainSettings) -> Explanation:
    """Rank the run's training examples by how much each supports the answer (generated when not given)."""
    attribute = AttributeSettings(methods=settings.methods, epoch=settings.epoch)
    loaded_run = open_run(run, settings.epoch)
    prompt, response = settings.prompt, settings.response
    generated = response is None
    chat = is_chat(loaded_run.task.train)
    if response is None:
        [response] = generate_answers(
            loaded_run.model,
            loaded_run.tokenizer,
            [prompt],
            answer_rendering(loaded_run),
            max_new_tokens=settings.max_new_tokens,
        )
    query = query_example(QUERY_ID, prompt, response, "?", chat)
    features = answer_features(loaded_run, attribute)
    train_examples = loaded_run.task.train
    ranked: dict[str, list[Ranked]] = {}
    rows: dict[str, torch.Tensor] = {}
    tokens: dict[str, TokenShares] = {}
    training_tokens: dict[str, dict[str, TrainingTokens]] = {}
    for group in by_trajectory(attribute.build_methods()):
        if is_replay(group):  # MAGIC: the query's metagradient through the replayed run
            replay = open_replay(loaded_run)
            for name, method in group.items():
                rows[name] = typing.cast(ReplayMethod, method).score_replay(replay, [query])
                ranked[name] = _top(rows[name][0], train_examples, settings.top)
            continue
        used = features_for(features, group)
        train = used.stream("train")  # read back shard by shard: memory does not grow with the training set
        test = used.collect([query], desc="query")
        for name, method in group.items():
            rows[name] = stream_scores(method, train, test)
            ranked[name] = _top(rows[name][0], train_examples, settings.top)
        by_id = {e.id: e for e in train_examples}
        for name, method in group.items():
            if settings.tokens and isinstance(method, RepresentationMethod):
                shown = [by_id[r.id] for r in ranked[name]]
                training_tokens[name] = score_training_tokens(loaded_run, method, test, shown)
        if settings.tokens and any(method.token_additive for method in group.values()):
            per_token, token_rows = used.collect_tokens(query)
            for name, method in group.items():
                if not method.token_additive:
                    continue  # rept, in the same group: its tokens are the training example's, above
                shares = stream_scores(method, train, per_token)  # [tokens, n_train]
                index = {e.id: i for i, e in enumerate(train_examples)}
                tokens[name] = TokenShares(
                    token_rows.tokens,
                    token_rows.in_response,
                    {r.id: shares[:, index[r.id]].tolist() for r in ranked[name]},
                )
    ranked = {name: ranked[name] for name in attribute.methods}  # in the order asked for
    tokens = {name: tokens[name] for name in attribute.methods if name in tokens}
    training_tokens = {name: training_tokens[name] for name in attribute.methods if name in training_tokens}
    explanation = Explanation(prompt, response, generated, ranked, judge_trust(rows), tokens, training_tokens)
    keep_explanation(run, explanation, loaded_run.epoch)
    return explanation


def answer_rendering(loaded_run: LoadedRun) -> PromptSettings:
    """How the run's model is prompted for a new answer: through the chat template where the run's data
    are conversations (as its training examples were rendered), else with the run's template."""
    prompt = loaded_run.config.prompt
    return dataclasses.replace(prompt, template="chat") if is_chat(loaded_run.task.train) else prompt


def answer_features(loaded_run: LoadedRun, attribute: AttributeSettings) -> RunFeatures:
    """The run's features, for scoring new answers against its training examples."""
    config = loaded_run.config
    return RunFeatures(
        loaded_run,
        config.prompt,
        GradientSettings(),
        config.model,
        attribute.shard_size,
        attribute.needs_kronecker,
    )


def keep_explanation(run: Path, explanation: Explanation, epoch: int | None) -> Path:
    """Keep ``explanation`` in the run (the report shows every kept one); the same query, answer, methods
    and epoch explained again replace it."""
    identity = [
        explanation.prompt,
        explanation.response,
        list(explanation.top),
        epoch,
        bool(explanation.tokens or explanation.training_tokens),
    ]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    path = explanation_file(run, key)
    write_json_atomic(path, {**explanation.to_dict(), "epoch": epoch})
    return path


def judge_trust(scores: dict[str, torch.Tensor]) -> dict[str, Trust]:
    """Each method's verdict for the first test row of its scores, by the shipped calibration."""
    model = shipped_trust_model()
    if model is None:
        return {}
    found = {}
    for name, signals in trust_signals(scores).items():
        predicted = float(model.predict(signals)[0])
        found[name] = Trust(
            model.verdicts(signals)[0],
            float(signals.agreement[0]),
            float(signals.margin[0]),
            predicted,
            trust_k(next(iter(scores.values())).shape[1]),
            model.calibrated_for(name),
        )
    return found


def _top(scores: torch.Tensor, examples: Sequence[Example], count: int) -> list[Ranked]:
    order = np.argsort(-scores.double().numpy(), kind="stable")[:count]  # ties: lower training index first
    return [
        Ranked(
            rank + 1,
            float(scores[i]),
            examples[i].id,
            examples[i].label,
            examples[i].prompt,
            examples[i].response,
        )
        for rank, i in enumerate(order.tolist())
    ]


def format_explanation(explanation: Explanation, width: int = 90) -> str:
    """The rankings as plain-text tables, texts cut to ``width`` characters."""
    source = "generated by the model" if explanation.generated else "given"
    lines = [
        f"prompt:   {_cut(explanation.prompt, width)}",
        f"response: {_cut(explanation.response, width)} ({source})",
    ]
    for name, rows in explanation.top.items():
        lines += [
            "",
            f"{name}: top {len(rows)} training examples (higher score = supports the response more)",
        ]
        trust = explanation.trust.get(name)
        if trust is not None and trust.verdict == "unknown":
            lines.append("trust: unknown (a verdict needs the agreement of two or more methods)")
        elif trust is not None:
            lines.append(
                f"trust: {trust.verdict} (predicted LDS {trust.predicted_lds:.2f}, from top-{trust.k} "
                f"agreement with the other methods {trust.agreement:.2f} and score margin {trust.margin:.2f})"
                + ("" if trust.calibrated else f"; the calibration never saw {name}: an extrapolation")
            )
        lines.append(f"{'rank':>4}  {'score':>10}  {'label':<14}  training example")
        for r in rows:
            text = _cut(f"{r.prompt} => {r.response}", width)
            lines.append(f"{r.rank:>4}  {r.score:>10.4g}  {_cut(r.label, 14):<14}  {text}")
        if name in explanation.tokens and rows:
            lines += _token_lines(explanation.tokens[name], rows[0], width)
        if name in explanation.training_tokens and rows:
            lines += _training_token_lines(explanation.training_tokens[name][rows[0].id], rows[0], width)
    return "\n".join(lines)


def _token_lines(shares: TokenShares, best: Ranked, width: int, count: int = 8) -> list[str]:
    """The answer tokens that carry most of the top example's score, largest share first."""
    values = shares.shares[best.id]
    response = [i for i, inside in enumerate(shares.in_response) if inside]
    if not response:
        return ["no token of the response is scored (it was cut by --max-length, or the loss skips it)"]
    on_response = sum(values[i] for i in response)
    order = sorted(response, key=lambda i: -abs(values[i]))[:count]
    listed = ", ".join(
        f"{shares.tokens[i].strip() or repr(shares.tokens[i])} {values[i]:+.3g}" for i in order
    )
    return [
        f"tokens of the response carrying #1's score {best.score:.4g} (the response's tokens "
        f"{on_response:+.4g}, the prompt's {best.score - on_response:+.4g}):",
        f"      {_cut(listed, width)}",
    ]


def _training_token_lines(found: TrainingTokens, best: Ranked, width: int, count: int = 8) -> list[str]:
    """The tokens of the top training example whose signatures match the answer's most."""
    # the prompt's last token is where the query's own signature is taken, so it matches by construction
    # (its score is the example's): the other tokens are the ones that say something
    others = [i for i in range(len(found.scores)) if i != found.sample_row]
    order = sorted(others, key=lambda i: -found.scores[i])[:count]
    listed = ", ".join(
        f"{found.tokens[i].strip() or repr(found.tokens[i])}{'' if found.in_response[i] else '(p)'} "
        f"{found.scores[i]:+.3g}"
        for i in order
    )
    return [
        f"tokens of #1 most like the answer besides its prompt's last token (whose score is #1's, "
        f"{found.scores[found.sample_row]:+.4g}; (p): a token of its prompt):",
        f"      {_cut(listed, width)}",
    ]


def _cut(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
