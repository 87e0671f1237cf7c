"""Built-in ``grammars`` task: name the rule that rewrote a sentence (10 classes, 90/10 per class).

Shaped like the study's ``grammars`` dataset (a class-attribution task whose classes are rewriting
rules), but with rules and vocabularies of our own so that it can be regenerated for any seed without
the study's files. Every sentence is used once, so no test sentence ever appears in training.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ..schema import Example, TaskData

TRAIN_PER_CLASS = 90
TEST_PER_CLASS = 10

_ADJECTIVES = (
    "sleepy", "curious", "brave", "quiet", "happy", "tiny", "clever", "gentle",
    "busy", "proud", "lazy", "bright", "shy", "wild", "calm", "friendly",
)  # fmt: skip
_SUBJECTS = (
    "cat", "farmer", "robot", "child", "teacher", "dog", "painter", "sailor",
    "fox", "baker", "pilot", "owl", "student", "rabbit", "driver", "poet",
)  # fmt: skip
_VERBS = (
    "watches", "paints", "finds", "carries", "follows", "builds", "cleans", "draws",
    "chases", "visits", "opens", "fixes", "pushes", "reads", "climbs", "holds",
)  # fmt: skip
_OBJECTS = (
    "river", "ladder", "garden", "window", "lantern", "bridge", "basket", "mountain",
    "letter", "kettle", "wagon", "castle", "pencil", "meadow", "drum", "compass",
)  # fmt: skip
_VOWELS = frozenset("aeiouAEIOU")


def _swap_first_last(words: list[str]) -> list[str]:
    return [words[-1], *words[1:-1], words[0]]


# Each rule maps a sentence's words to new words; none is the identity on the sentences made below
# (they start with a capitalised "The" and end with a lower-case noun).
RULES: dict[str, Callable[[list[str]], list[str]]] = {
    "Reverse Order of Words": lambda w: w[::-1],
    "Uppercase Every Word": lambda w: [x.upper() for x in w],
    "Remove All Vowels": lambda w: ["".join(c for c in x if c not in _VOWELS) for x in w],
    "Repeat Each Word Twice": lambda w: [y for x in w for y in (x, x)],
    "Append 'ish' To Each Word": lambda w: [x + "ish" for x in w],
    "Swap First and Last Word": _swap_first_last,
    "Join Words with Dashes": lambda w: ["-".join(w)],
    "Reverse Letters of Each Word": lambda w: [x[::-1] for x in w],
    "Double Every Vowel": lambda w: ["".join(c * 2 if c in _VOWELS else c for c in x) for x in w],
    "Capitalize Every Word": lambda w: [x.capitalize() for x in w],
}


def rewrite(rule: str, sentence: str) -> str:
    """Apply the named rule to a sentence (words are separated by single spaces)."""
    return " ".join(RULES[rule](sentence.split(" ")))


def _unique_sentences(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct sentences "The <adj> <subject> <verb> the <object>", in drawing order."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        words = (rng.choice(_ADJECTIVES), rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS))
        seen.setdefault("The {} {} {} the {}".format(*words), None)
    return list(seen)


def _examples(split: str, sentences: list[str], per_class: int) -> tuple[Example, ...]:
    examples: list[Example] = []
    for rule_index, rule in enumerate(RULES):
        for sentence in sentences[rule_index * per_class : (rule_index + 1) * per_class]:
            prompt = f"Determine the grammar rule: {sentence} -> {rewrite(rule, sentence)}"
            examples.append(Example(f"grammars-{split}-{len(examples):04d}", prompt, rule, rule))
    return tuple(examples)


def make_grammars(seed: int) -> TaskData:
    """The ``grammars`` task for ``seed``: 900 train and 100 test examples over 10 rules."""
    rng = random.Random(f"grammars:{seed}")
    n_train, n_test = TRAIN_PER_CLASS * len(RULES), TEST_PER_CLASS * len(RULES)
    sentences = _unique_sentences(rng, n_train + n_test)
    return TaskData(
        name="grammars",
        train=_examples("train", sentences[:n_train], TRAIN_PER_CLASS),
        test=_examples("test", sentences[n_train:], TEST_PER_CLASS),
    )
