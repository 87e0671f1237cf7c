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
