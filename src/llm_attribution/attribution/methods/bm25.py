"""BM25: a lexical baseline, no model. Each training example's prompt and response is a document; the
test example's prompt and response is the query. Bergson's leaderboard lists it (LDS 0.22 on WikiText),
and it tells how much of an attribution is word overlap: a method that does no better than BM25 on a
task has not shown that it sees more than the words.

The index is ``bm25s`` (Lucene's scoring, lower-cased words of two or more letters, English stop words
dropped), built over the training texts of the run; the IDF depends on the whole training set, so the
scores are computed whole, also when the rest is streamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import bm25s
import torch
from bm25s.tokenization import Tokenizer

from ...core.errors import DataError
from ...core.settings import option, require, require_positive
from ..base import MethodSettings, TextMethod
from ..registry import register


@dataclass(frozen=True)
class Bm25Settings(MethodSettings):
    """BM25's two constants, and whether English stop words are dropped."""

    k1: float = option(1.5, "BM25 term-frequency saturation k1")
    b: float = option(0.75, "BM25 length normalisation b (0: none, 1: full)")
    stopwords: bool = option(True, "drop English stop words before indexing")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("k1", self.k1)
        require(0.0 <= self.b <= 1.0, f"bm25.b must be between 0 and 1, got {self.b}")


@register
class Bm25(TextMethod):
    """Score = BM25 of the test text as the query against each training text; HIGHER = more words in
    common, weighted by their rarity (taken as support)."""

    name = "bm25"
    summary = "BM25 of the test prompt and response against each training example's (lexical, no model)"
    Settings = Bm25Settings
    settings: Bm25Settings

    def score_texts(self, train: Sequence[str], test: Sequence[str]) -> torch.Tensor:
        if not train:
            raise DataError("no training texts to index")
        tokenizer = Tokenizer(stopwords="english" if self.settings.stopwords else [])
        corpus = tokenizer.tokenize(list(train), return_as="tuple", show_progress=False)
        index = bm25s.BM25(k1=self.settings.k1, b=self.settings.b, method="lucene")
        index.index(corpus, show_progress=False)
        # words no training text has map to the empty token, which scores 0
        queries = tokenizer.tokenize(list(test), update_vocab=False, return_as="ids", show_progress=False)
        documents, scores = index.retrieve(queries, k=len(train), show_progress=False, n_threads=1)
        out = torch.zeros(len(test), len(train), dtype=torch.float32)
        out.scatter_(
            1, torch.as_tensor(documents, dtype=torch.long), torch.as_tensor(scores, dtype=torch.float32)
        )
        return out
