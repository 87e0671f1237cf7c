"""Which tokens of a top training example carry a representation method's match with the query (RepT's
token-level view, ``explain --tokens``): the method's own score of the query's representation against
the training example's signature at each of its tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..attribution.base import RepresentationMethod
from ..core.errors import ConfigError
from ..data.schema import Example
from ..features.gradients import Features
from ..features.signatures import token_signatures
from .runs import LoadedRun

BATCH = 8  # training examples per forward/backward pass


@dataclass(frozen=True)
class TrainingTokens:
    """One training example's tokens, each scored like the whole example against the query; the row at
    ``sample_row`` (its prompt's last token) is the example's own score."""

    tokens: list[str]
    in_response: list[bool]
    scores: list[float]
    sample_row: int


def query_signature(method: RepresentationMethod, query: Features) -> torch.Tensor:
    """The query's ``[1, width]`` representation as ``method`` scores it (RepT: joined with its gradient)."""
    if query.representations is None or query.representation_gradients is None:
        raise ConfigError(f"{method.name} token scores need the query's representation and its gradient")
    return torch.cat([query.representations, query.representation_gradients], dim=1)


def score_training_tokens(
    loaded_run: LoadedRun,
    method: RepresentationMethod,
    query: Features,
    examples: Sequence[Example],
) -> dict[str, TrainingTokens]:
    """Per training example of ``examples`` (by id): each of its tokens' score against the query."""
    if not method.training_token_scores:
        raise ConfigError(f"{method.name} does not score the tokens of training examples")
    signature = query_signature(method, query)
    found: dict[str, TrainingTokens] = {}
    prompt = loaded_run.config.prompt
    for start in range(0, len(examples), BATCH):
        chunk = list(examples[start : start + BATCH])
        for tokens in token_signatures(
            loaded_run.model, loaded_run.tokenizer, chunk, prompt, loaded_run.weights
        ):
            scores = method.score_representations(tokens.signatures, signature)[0]
            found[tokens.id] = TrainingTokens(
                tokens.tokens, tokens.in_response, scores.tolist(), tokens.last_prompt
            )
    return found
