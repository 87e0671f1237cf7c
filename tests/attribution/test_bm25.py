"""BM25 against its formula (Lucene's), computed by hand on texts whose words are all distinct per query."""

from __future__ import annotations

import math
import re

import torch

from llm_attribution.attribution.base import TextMethod
from llm_attribution.attribution.registry import get_method

TRAIN = [
    "Rewrite quickly: planets orbit stars",
    "Rewrite slowly: rivers reach oceans",
    "Translate: planets planets everywhere orbit",
    "Count: oceans",
    "Rewrite: mountains rise",
]
TEST = ["Rewrite: planets orbit", "zebra xylophone", "oceans mountains"]


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w\w+\b", text.lower())


def _lucene(train: list[str], test: list[str], k1: float = 1.5, b: float = 0.75) -> torch.Tensor:
    docs = [_words(t) for t in train]
    average = sum(map(len, docs)) / len(docs)
    out = torch.zeros(len(test), len(train), dtype=torch.float64)
    for q, query in enumerate(test):
        for term in set(_words(query)):
            df = sum(term in d for d in docs)
            if df == 0:
                continue
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            for j, d in enumerate(docs):
                tf = d.count(term)
                out[q, j] += idf * tf / (tf + k1 * (1 - b + b * len(d) / average))
    return out


def test_equals_the_lucene_formula() -> None:
    method = get_method("bm25", stopwords=False)
    assert isinstance(method, TextMethod)
    got = method.score_texts(TRAIN, TEST)
    expected = _lucene(TRAIN, TEST)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert int(got[0].argmax()) in (0, 2) and bool((got[1] == 0).all())  # overlap wins; no overlap: 0


def test_its_constants_are_used() -> None:
    flat = get_method("bm25", stopwords=False, b=0.0, k1=0.5)
    assert isinstance(flat, TextMethod)
    torch.testing.assert_close(
        flat.score_texts(TRAIN, TEST).double(), _lucene(TRAIN, TEST, k1=0.5, b=0.0), rtol=1e-5, atol=1e-6
    )


def test_stop_words_do_not_count() -> None:
    method = get_method("bm25")
    assert isinstance(method, TextMethod)
    scores = method.score_texts(["the cat and the dog", "a fish"], ["the and a"])
    assert bool((scores == 0).all())
