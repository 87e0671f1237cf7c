"""The loop structure of the study's official scoring code, one per method, for like-for-like speed ratios.

The official code keeps gradients as ``{example: {block: 2-D tensor}}`` dictionaries and scores in Python
loops. Each function here re-implements one method's loops (written here, not copied, with the
same loop nesting and the same per-iteration tensor operations) so that a method of ours is compared with
the official form of *the same method*:

- ``hessian-free`` (the official ``gmatch``): the inverse product is the test gradient itself, then the
  per-pair loop ``for train: for test: for block: sum(h * g)``;
- ``datainf``: per test and block, the damping from a loop over training gradients (mean of squares), then
  the Sherman-Morrison sum in a loop over training examples, then the same per-pair loop;
- ``lissa-study``: per test and block, ``depth`` recursion steps, each with the Fisher product as a loop
  over training examples, then the per-pair loop;
- ``exact`` (the official "Original"): per block, the dense d x d Fisher summed from outer products in a
  loop over training examples, damped and inverted, applied to each test gradient; then the per-pair loop.

Each part is timed on a few test examples (or blocks) and extrapolated linearly to the full grid, which
is what the loop structure makes exact up to timer noise: every iteration does the same work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

Gradients = dict[int, dict[str, torch.Tensor]]  # example -> block -> 2-D gradient, as the official code


def random_gradients(shapes: dict[str, tuple[int, int]], count: int, seed: int) -> Gradients:
    generator = torch.Generator().manual_seed(seed)
    return {
        i: {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}
        for i in range(count)
    }


def _damping(train: Gradients, block: str) -> torch.Tensor:
    """The official damping: a loop over training examples for each one's mean square, then / 10."""
    squares = torch.zeros(len(train))
    for i in train:
        squares[i] = torch.mean(train[i][block] ** 2)
    return torch.mean(squares) / 10


def gmatch_products(train: Gradients, test: Gradients) -> Gradients:
    return {t: dict(blocks) for t, blocks in test.items()}


def _per_test_and_block(
    train: Gradients, test: Gradients, product: Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor]
) -> Gradients:
    """The official outer loops: for every test example and block, the damping from its own loop over
    training examples, then that block's inverse product ``product(v, block, damping)``."""
    return {
        t: {block: product(v, block, _damping(train, block)) for block, v in test[t].items()} for t in test
    }


def datainf_products(train: Gradients, test: Gradients) -> Gradients:
    n = len(train)

    def product(v: torch.Tensor, block: str, damping: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(v.shape, dtype=v.dtype)
        for i in train:
            g = train[i][block]
            c = torch.sum(v * g) / (damping + torch.sum(g**2))
            h += (v - c * g) / (n * damping)
        return h

    return _per_test_and_block(train, test, product)


def lissa_study_products(
    train: Gradients, test: Gradients, depth: int = 3, scale: float = 1000.0
) -> Gradients:
    n = len(train)

    def product(v: torch.Tensor, block: str, damping: torch.Tensor) -> torch.Tensor:
        h = v.clone()
        for _ in range(depth):
            fisher_h = torch.zeros(v.shape, dtype=v.dtype)
            for i in train:
                g = train[i][block]
                fisher_h += torch.sum(g * h) * g / n
            h = v + h - (fisher_h - damping * h) / scale
        return h

    return _per_test_and_block(train, test, product)


def exact_inverses(train: Gradients, blocks: list[str]) -> dict[str, torch.Tensor]:
    """The official "Original": per block the dense d x d damped Fisher, from a loop of outer products."""
    n = len(train)
    inverses = {}
    for block in blocks:
        d = train[0][block].numel()
        fisher = torch.zeros(d, d, dtype=train[0][block].dtype)
        for i in train:
            g = train[i][block].reshape(-1)
            fisher += torch.outer(g, g) / n
        inverses[block] = torch.linalg.inv(fisher + _damping(train, block) * torch.eye(d, dtype=fisher.dtype))
    return inverses


def pair_loop(products: Gradients, train: Gradients) -> dict[int, dict[int, float]]:
    """The official final loop: every (train, test) pair summed block by block. The official sign: minus
    the product (lower = more supportive), the reverse of ours."""
    scores: dict[int, dict[int, float]] = {}
    for i in train:
        scores[i] = {}
        for t in products:
            value = torch.zeros(())
            for block in products[t]:
                value += torch.sum(products[t][block] * train[i][block])
            scores[i][t] = -float(value)
    return scores


@dataclass(frozen=True)
class OfficialTiming:
    """Seconds of the official loop structure for the full grid, extrapolated, and from what."""

    seconds: float
    products_s: float
    pairs_s: float
    timed: str


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def time_official(
    method: str, shapes: dict[str, tuple[int, int]], n_train: int, n_test: int, timed_tests: int = 1
) -> OfficialTiming:
    """The official loops of ``method`` on ``n_train`` x ``n_test`` gradients of ``shapes``: the inverse
    products timed on ``timed_tests`` test examples (``exact``: one inverse per block width), the pair loop
    on ``timed_tests`` test examples against every training example; each scaled to the full grid."""
    train = random_gradients(shapes, n_train, 0)
    test = random_gradients(shapes, timed_tests, 1)
    if method == "exact":
        # Blocks come in a few widths (the embedded model: 2304 and 768); one block of each width is
        # timed and counted once per block of that width.
        widths: dict[int, list[str]] = {}
        for name, (rows, cols) in shapes.items():
            widths.setdefault(rows * cols, []).append(name)
        products_s = 0.0
        for names in widths.values():
            start = time.perf_counter()
            one = exact_inverses(train, names[:1])[names[0]]
            inverse_s = time.perf_counter() - start
            apply_s = _timed(lambda one=one, name=names[0]: [one @ test[t][name].reshape(-1) for t in test])
            products_s += len(names) * (inverse_s + apply_s * n_test / timed_tests)
        timed = f"one inverse per block width ({len(widths)}), products on {timed_tests} test example(s)"
    else:
        build = {
            "hessian-free": gmatch_products,
            "datainf": datainf_products,
            "lissa-study": lissa_study_products,
        }
        products_s = _timed(lambda: build[method](train, test)) * n_test / timed_tests
        timed = f"products on {timed_tests} test example(s)"
    products = gmatch_products(train, test)
    pairs_s = _timed(lambda: pair_loop(products, train)) * n_test / timed_tests
    return OfficialTiming(products_s + pairs_s, products_s, pairs_s, timed + f", pairs on {timed_tests}")


OFFICIAL_METHODS = ("hessian-free", "datainf", "lissa-study", "exact")
