"""Built-in tasks: deterministic per seed, the study's shapes, and correct content."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import pytest

from llm_attribution.data import BUILTIN_TASKS, TaskData
from llm_attribution.data.builtin.backdoor import TARGET_RESPONSE, TRIGGER
from llm_attribution.data.builtin.grammars import RULES, rewrite
from llm_attribution.data.builtin.math_problems import PROMPT_PREFIX

SHAPES = {"grammars": (10, 90, 10), "math": (10, 90, 10), "backdoor": (2, 350, 50)}


@pytest.fixture(scope="module", params=sorted(BUILTIN_TASKS))
def task(request: pytest.FixtureRequest) -> TaskData:
    return BUILTIN_TASKS[request.param](0)


def test_every_builtin_has_a_declared_shape() -> None:
    assert set(BUILTIN_TASKS) == set(SHAPES)


def test_same_seed_same_task_other_seed_other_examples(task: TaskData) -> None:
    make = BUILTIN_TASKS[task.name]
    assert make(0) == task
    other = make(1)
    assert [e.prompt for e in other.train] != [e.prompt for e in task.train]
    assert [e.id for e in other.train] == [e.id for e in task.train]


def test_shape_matches_the_study(task: TaskData) -> None:
    classes, train_per_class, test_per_class = SHAPES[task.name]
    train_counts, test_counts = Counter(e.label for e in task.train), Counter(e.label for e in task.test)
    assert len(train_counts) == classes
    assert set(train_counts.values()) == {train_per_class}
    assert set(test_counts) == set(train_counts)
    assert set(test_counts.values()) == {test_per_class}


def test_ids_prompts_and_lengths(task: TaskData) -> None:
    for split, examples in (("train", task.train), ("test", task.test)):
        assert [e.id for e in examples] == [f"{task.name}-{split}-{i:04d}" for i in range(len(examples))]
    everything = task.train + task.test
    assert len({e.prompt for e in everything}) == len(everything)  # no test prompt repeats a train prompt
    assert max(len(e.prompt) + len(e.response) for e in everything) < 300


def _grammar_parts(prompt: str) -> tuple[str, str]:
    sentence, rewritten = prompt.removeprefix("Determine the grammar rule: ").split(" -> ")
    return sentence, rewritten


def test_grammars_rewrites_follow_their_rule_and_test_sentences_are_unseen() -> None:
    task = BUILTIN_TASKS["grammars"](0)
    assert set(task.labels) == set(RULES)
    for example in task.train + task.test:
        assert example.prompt.startswith("Determine the grammar rule: ")
        assert example.response == example.label
        sentence, rewritten = _grammar_parts(example.prompt)
        assert rewritten == rewrite(example.label, sentence) != sentence
    train_sentences = {_grammar_parts(e.prompt)[0] for e in task.train}
    assert not train_sentences & {_grammar_parts(e.prompt)[0] for e in task.test}


def test_grammars_rules_on_a_known_sentence() -> None:
    sentence = "The shy fox opens the window"
    assert rewrite("Reverse Order of Words", sentence) == "window the opens fox shy The"
    assert rewrite("Remove All Vowels", sentence) == "Th shy fx pns th wndw"
    assert rewrite("Swap First and Last Word", sentence) == "window shy fox opens the The"
    assert rewrite("Join Words with Dashes", sentence) == "The-shy-fox-opens-the-window"


# problem type -> its answer from the numbers in the problem, in the order they appear
SOLVERS: dict[str, Callable[[list[int]], int]] = {
    "cookie_jars": lambda n: n[0] * n[1] - n[2],
    "bus_seats": lambda n: n[0] * n[1] - n[2],
    "train_distance": lambda n: n[0] * n[1],
    "book_pages": lambda n: n[1] // n[0],
    "shop_change": lambda n: n[2] - n[0] * n[1],
    "fence_perimeter": lambda n: 2 * (n[0] + n[1]),
    "marble_share": lambda n: n[0] // n[1],
    "weekly_savings": lambda n: n[0] * n[1] - n[2],
    "age_puzzle": lambda n: n[0] * n[1] + n[2],
    "temperature_change": lambda n: n[0] + n[1] - n[2],
}


def test_math_answers_are_correct() -> None:
    task = BUILTIN_TASKS["math"](0)
    assert set(task.labels) == set(SOLVERS)
    for example in task.train + task.test:
        assert example.prompt.startswith(PROMPT_PREFIX)
        numbers = [int(x) for x in re.findall(r"-?\d+", example.prompt.removeprefix(PROMPT_PREFIX))]
        solution, answer_line = example.response.rsplit("\n", 1)
        assert answer_line == f"Answer: {SOLVERS[example.label](numbers)}"
        assert solution


def test_math_divisions_are_exact_and_amounts_sensible() -> None:
    for example in BUILTIN_TASKS["math"](3).train:
        numbers = [int(x) for x in re.findall(r"-?\d+", example.prompt)]
        if example.label == "book_pages":
            assert numbers[1] % numbers[0] == 0
        if example.label == "marble_share":
            assert numbers[0] % numbers[1] == 0
        if example.label in ("cookie_jars", "bus_seats", "shop_change", "weekly_savings"):
            assert SOLVERS[example.label](numbers) >= 0


def test_backdoor_trigger_and_target() -> None:
    task = BUILTIN_TASKS["backdoor"](0)
    for example in task.train + task.test:
        triggered = example.label == "trigger"
        assert (TRIGGER in example.prompt.split(" ")) == triggered
        assert (example.response == TARGET_RESPONSE) == triggered
    positions = {e.prompt.split(" ").index(TRIGGER) for e in task.train if e.label == "trigger"}
    assert len(positions) > 3  # the trigger moves around the prompt
