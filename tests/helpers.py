"""Small builders shared by tests: tiny tasks and settings that run in seconds."""

from __future__ import annotations

from llm_attribution.cli import main
from llm_attribution.data.schema import Example, TaskData


def toy_task(n_train: int = 24, n_test: int = 6, n_classes: int = 3) -> TaskData:
    """A class task whose response is determined by the class, short enough for the byte tokenizer."""
    words = ["apple", "river", "stone", "cloud", "maple", "ember"]

    def make(split: str, i: int) -> Example:
        label = f"c{i % n_classes}"
        return Example(f"{split}-{i}", f"say {words[i % len(words)]} {i}", f"class {label}", label)

    return TaskData(
        "toy",
        tuple(make("train", i) for i in range(n_train)),
        tuple(make("test", i) for i in range(n_test)),
    )


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    """``llm-attr ARGV`` in-process: (exit status, stdout, stderr); argparse exits become statuses."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def tiny_run_args(task: str = "grammars", train: int = 60, test: int = 10, epochs: int = 2) -> list[str]:
    """Options of a quick run on the tiny model (seconds), without --out and --methods."""
    return [
        "--task",
        task,
        "--model",
        "tiny",
        "--train-limit",
        str(train),
        "--test-limit",
        str(test),
        "--epochs",
        str(epochs),
        "--quiet",
    ]


def several_token_case(seed: int, n: int = 25, t: int = 3, o: int = 3, i: int = 5):  # type: ignore[no-untyped-def]
    """Examples of several tokens with their own inputs (the Fisher is not a Kronecker product): float64
    training gradients ``[n, o*i]``, 4 test rows, and the token-level factors of block ``"b"``."""
    import torch

    from llm_attribution.features.kronecker import KroneckerFactors

    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, t, i, generator=gen, dtype=torch.float64)
    g = torch.randn(n, t, o, generator=gen, dtype=torch.float64)
    train = torch.einsum("nto,nti->noi", g, u).reshape(n, -1)
    test = torch.randn(4, o * i, generator=gen, dtype=torch.float64)
    factors = KroneckerFactors()
    factors.add("b", u.reshape(-1, i), g.reshape(-1, o))
    factors.count(n)
    return train, test, factors
