"""Built-in ``math`` task: templated word problems, one class per template (10 classes, 90/10 per class).

Shaped like the study's ``math`` dataset: the prompt asks to solve a short word problem and the response
is a one-line worked solution ending in ``Answer: <number>``. Answers are computed, never typed, so the
model is trained on correct arithmetic. The numbers appear in the problem in the order the solution
uses them, which keeps the answers checkable from the prompt alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ..schema import Example, TaskData

TRAIN_PER_CLASS = 90
TEST_PER_CLASS = 10
PROMPT_PREFIX = "Solve the following math problem. "

_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Leo")

Problem = tuple[str, str, int]  # (problem text, worked solution without the answer line, answer)


def _cookie_jars(rng: random.Random, name: str) -> Problem:
    jars, per, eaten = rng.randint(2, 9), rng.randint(5, 20), rng.randint(1, 9)
    total = jars * per
    return (
        f"{name} has {jars} jars with {per} cookies each and eats {eaten} cookies. "
        "How many cookies are left?",
        f"Cookies = {jars} x {per} = {total}. Left = {total} - {eaten} = {total - eaten}.",
        total - eaten,
    )


def _bus_seats(rng: random.Random, name: str) -> Problem:
    rows, per = rng.randint(8, 15), rng.randint(2, 4)
    taken = rng.randint(1, rows * per - 1)
    seats = rows * per
    return (
        f"{name}'s bus has {rows} rows of {per} seats and {taken} seats are taken. How many seats are free?",
        f"Seats = {rows} x {per} = {seats}. Free = {seats} - {taken} = {seats - taken}.",
        seats - taken,
    )


def _train_distance(rng: random.Random, name: str) -> Problem:
    speed, hours = rng.randint(4, 16) * 10, rng.randint(2, 9)
    return (
        f"{name} rides a train at {speed} km per hour for {hours} hours. How many km does {name} travel?",
        f"Distance = speed x time = {speed} x {hours}.",
        speed * hours,
    )


def _book_pages(rng: random.Random, name: str) -> Problem:
    per_day, days = rng.randint(5, 40), rng.randint(3, 20)
    pages = per_day * days
    return (
        f"{name} reads {per_day} pages a day. The book has {pages} pages. How many days does the book take?",
        f"Days = {pages} / {per_day}.",
        days,
    )


def _shop_change(rng: random.Random, name: str) -> Problem:
    count, price = rng.randint(2, 9), rng.randint(2, 12)
    cost = count * price
    paid = rng.choice([b for b in (20, 50, 100, 200) if b >= cost])
    return (
        f"{name} buys {count} pens at {price} dollars each and pays with {paid} dollars. "
        f"How much change does {name} get?",
        f"Cost = {count} x {price} = {cost}. Change = {paid} - {cost}.",
        paid - cost,
    )


def _fence_perimeter(rng: random.Random, name: str) -> Problem:
    length, width = rng.randint(5, 60), rng.randint(3, 40)
    return (
        f"{name}'s garden is {length} m long and {width} m wide. How many metres of fence go all around it?",
        f"Perimeter = 2 x ({length} + {width}).",
        2 * (length + width),
    )


def _marble_share(rng: random.Random, name: str) -> Problem:
    friends, each = rng.randint(2, 12), rng.randint(3, 25)
    total = friends * each
    return (
        f"{name} shares {total} marbles equally among {friends} friends. "
        "How many marbles does each friend get?",
        f"Each = {total} / {friends}.",
        each,
    )


def _weekly_savings(rng: random.Random, name: str) -> Problem:
    per_week, weeks = rng.randint(5, 30), rng.randint(4, 20)
    saved = per_week * weeks
    spent = rng.randint(1, saved)
    return (
        f"{name} saves {per_week} dollars a week for {weeks} weeks, then spends {spent} dollars. "
        "How many dollars are left?",
        f"Saved = {per_week} x {weeks} = {saved}. Left = {saved} - {spent}.",
        saved - spent,
    )


def _age_puzzle(rng: random.Random, name: str) -> Problem:
    age, times, years = rng.randint(4, 15), rng.randint(2, 5), rng.randint(1, 10)
    return (
        f"{name} is {age} years old and {name}'s aunt is {times} times as old. "
        f"How old will the aunt be in {years} years?",
        f"Aunt now = {age} x {times} = {age * times}. Later = {age * times} + {years}.",
        age * times + years,
    )


def _temperature_change(rng: random.Random, name: str) -> Problem:
    start, rise, fall = rng.randint(-10, 15), rng.randint(2, 15), rng.randint(2, 25)
    return (
        f"At dawn {name} reads {start} degrees. It rises by {rise} degrees, then falls by {fall}. "
        "What is the temperature now?",
        f"Now = {start} + {rise} - {fall}.",
        start + rise - fall,
    )


PROBLEM_TYPES: dict[str, Callable[[random.Random, str], Problem]] = {
    "cookie_jars": _cookie_jars,
    "bus_seats": _bus_seats,
    "train_distance": _train_distance,
    "book_pages": _book_pages,
    "shop_change": _shop_change,
    "fence_perimeter": _fence_perimeter,
    "marble_share": _marble_share,
    "weekly_savings": _weekly_savings,
    "age_puzzle": _age_puzzle,
    "temperature_change": _temperature_change,
}


def _unique_problems(rng: random.Random, kind: str, count: int) -> list[Problem]:
    """``count`` distinct problems of one type, so no test prompt repeats a training prompt."""
    problems: dict[str, Problem] = {}
    while len(problems) < count:
        problem = PROBLEM_TYPES[kind](rng, rng.choice(_NAMES))
        problems.setdefault(problem[0], problem)
    return list(problems.values())


def make_math(seed: int) -> TaskData:
    """The ``math`` task for ``seed``: 900 train and 100 test problems over 10 problem types."""
    rng = random.Random(f"math:{seed}")
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for kind in PROBLEM_TYPES:
        problems = _unique_problems(rng, kind, TRAIN_PER_CLASS + TEST_PER_CLASS)
        for split, chunk in (("train", problems[:TRAIN_PER_CLASS]), ("test", problems[TRAIN_PER_CLASS:])):
            for text, solution, answer in chunk:
                examples = splits[split]
                example_id = f"math-{split}-{len(examples):04d}"
                response = f"{solution}\nAnswer: {answer}"
                examples.append(Example(example_id, PROMPT_PREFIX + text, response, kind))
    return TaskData(name="math", train=tuple(splits["train"]), test=tuple(splits["test"]))
