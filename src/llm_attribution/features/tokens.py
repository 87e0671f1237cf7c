"""Per-token gradients of one example, for per-token attribution: which tokens of an answer carry a
training example's score.

An example's loss is the mean of its ``T`` labelled tokens' losses, so its gradient is the sum over
tokens of ``grad(loss_t) / T``. Each row here is one such term: the gradient of one token's loss divided by
``T``, collected in one batched pass over ``T`` copies of the example that each keep one token's label.
For a method whose score is linear in the test gradient, the scores of these rows are each token's share
of the example's score, and they sum to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from ..core.errors import DataError
from ..data.schema import Example
from ..data.templates import IGNORE_INDEX, Encoded, PromptSettings, encode_examples
from .gradients import Features


@dataclass(frozen=True)
class TokenRows:
    """The labelled tokens of one example, one per row of its per-token features, in order."""

    positions: list[int]  # index of each token in the example's input ids
    tokens: list[str]  # each token's text
    in_response: list[bool]  # whether it is a token of the response (else of the prompt)


def token_copies(
    example: Example, tokenizer: PreTrainedTokenizerBase, prompt: PromptSettings
) -> tuple[list[Example], list[Encoded], TokenRows]:
    """One copy of ``example`` per labelled token, each with only that token's label kept."""
    [encoded] = encode_examples([example], tokenizer, prompt)
    positions = [p for p, label in enumerate(encoded.labels) if label != IGNORE_INDEX and p > 0]
    if not positions:
        raise DataError(f"example {example.id} has no token to attribute; raise --max-length")
    first_response = encoded.pad_prefix + encoded.prompt_length
    copies = [
        dataclasses.replace(
            encoded,
            labels=tuple(label if p == keep else IGNORE_INDEX for p, label in enumerate(encoded.labels)),
        )
        for keep in positions
    ]
    rows = TokenRows(
        positions,
        [str(tokenizer.decode([encoded.input_ids[p]])) for p in positions],
        [p >= first_response for p in positions],
    )
    examples = [dataclasses.replace(example, id=f"{example.id}@{p}") for p in positions]
    return examples, copies, rows


def token_features(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    prompt: PromptSettings,
    collect: Callable[[list[Example], list[Encoded]], Features],
) -> tuple[Features, TokenRows]:
    """``collect`` on the example's per-token copies, each row divided by the token count: rows that sum
    to the example's own gradient."""
    examples, copies, rows = token_copies(example, tokenizer, prompt)
    features = collect(examples, copies)
    count = len(rows.positions)
    features.blocks = {name: block / count for name, block in features.blocks.items()}
    return features, rows
