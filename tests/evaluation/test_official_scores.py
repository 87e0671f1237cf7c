"""The official score files: the reader's format and errors, and the study's published numbers.

The last test feeds every shipped official score matrix to our metrics and must reproduce the table in
``shared/data/official-scores/README.md`` to 4 decimals: it pins down the sign convention, the choice
of k (floor of n_train / n_classes) and the tie order all at once. It uses ``shared_data_dir`` from
``tests/conftest.py``: skipped without ``../shared``, failing instead under ``LLM_ATTR_REQUIRE_SHARED=1``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from llm_attribution.core.errors import DataError
from llm_attribution.evaluation.metrics import evaluate
from llm_attribution.evaluation.official import read_official_scores
from llm_attribution.evaluation.score_files import check_score_shape


def write(tmp_path: Path, text: str, name: str = "scores.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_rows_with_index_column_and_negates(tmp_path: Path) -> None:
    scores = read_official_scores(write(tmp_path, "0,1,2\n0,-1.5,2,0\n1,3,-4e-1,7\n"))
    assert scores.dtype == torch.float64
    assert scores.tolist() == [[1.5, -2.0, 0.0], [-3.0, 0.4, -7.0]]


def test_reads_rows_without_index_column_and_orders_columns(tmp_path: Path) -> None:
    scores = read_official_scores(write(tmp_path, "1,0\n1,2\n3,4\n"))
    assert scores.tolist() == [[-2.0, -1.0], [-4.0, -3.0]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("0,1\n", "no test rows"),
        ("0,1\n0,1.0,x\n", r"scores\.csv:2: value 'x' in column 2"),
        ("0,1\n0,1.0,2.0\n1,1.0\n", r"scores\.csv:3: 2 cells"),
        ("0,1\n1.0,2.0,3.0,4.0\n", r"scores\.csv:2: 4 cells"),
        ("0,a\n1,2\n", r"scores\.csv:1: header cell 'a'"),
        ("0,2\n1,2\n", r"scores\.csv:1: header must list"),
        ("0,1\n1,1.0,2.0\n", r"scores\.csv:2: row index 1, expected 0"),
    ],
)
def test_malformed_files_are_data_errors_naming_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        read_official_scores(write(tmp_path, text))


def test_missing_file_and_shape_check(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_official_scores(tmp_path / "absent.csv")
    check_score_shape(torch.zeros(2, 3), 2, 3, "x.csv")
    with pytest.raises(DataError, match=r"x\.csv: score matrix has shape \(2, 3\).*3 test and 2 training"):
        check_score_shape(torch.zeros(2, 3), 3, 2, "x.csv")


# model, task_epochs, method, accuracy, coverage: the README's table, copied by hand.
PUBLISHED = [
    ("Llama-2-7b-chat-hf", "grammars_10", "gmatch", 0.14, 0.1263),
    ("Llama-2-7b-chat-hf", "grammars_10", "inf", 0.39, 0.2443),
    ("Llama-2-7b-chat-hf", "grammars_10", "lissa", 0.15, 0.1291),
    ("Llama-2-7b-chat-hf", "math_10", "gmatch", 1.00, 0.8448),
    ("Llama-2-7b-chat-hf", "math_10", "inf", 1.00, 0.8254),
    ("Llama-2-7b-chat-hf", "math_10", "lissa", 1.00, 0.8448),
    ("Llama-2-7b-chat-hf", "mixedS_50", "gmatch", 0.175, 0.5475),
    ("Llama-2-7b-chat-hf", "mixedS_50", "inf", 0.90, 0.6138),
    ("Llama-2-7b-chat-hf", "mixedS_50", "lissa", 0.175, 0.5475),
    ("Mistral-7B-Instruct-v0.3", "grammars_10", "gmatch", 0.50, 0.2824),
    ("Mistral-7B-Instruct-v0.3", "grammars_10", "inf", 0.35, 0.2438),
    ("Mistral-7B-Instruct-v0.3", "math_10", "gmatch", 0.94, 0.7492),
    ("Mistral-7B-Instruct-v0.3", "math_10", "inf", 0.96, 0.6803),
    ("Mistral-7B-Instruct-v0.3", "mixedS_50", "gmatch", 0.875, 0.5212),
    ("Mistral-7B-Instruct-v0.3", "mixedS_50", "inf", 0.975, 0.4250),
    ("Mistral-7B-Instruct-v0.3", "mixedS_50", "lissa", 0.875, 0.5200),
]


@functools.cache
def labels(split_dir: Path) -> tuple[str, ...]:
    from datasets import load_from_disk  # slow import; only these tests need it

    return tuple(load_from_disk(str(split_dir))["variation"])


@pytest.mark.shared
@pytest.mark.parametrize(("model", "run", "method", "accuracy", "coverage"), PUBLISHED, ids=lambda v: str(v))
def test_official_scores_reproduce_published_metrics(
    shared_data_dir: Path, model: str, run: str, method: str, accuracy: float, coverage: float
) -> None:
    path = shared_data_dir / "official-scores" / model / f"{run}_{method}.csv"
    task_dir = shared_data_dir / "paper-datasets" / run.split("_")[0]
    train, test = labels(task_dir / "train"), labels(task_dir / "test")
    scores = read_official_scores(path)
    check_score_shape(scores, len(test), len(train), path)
    metrics = evaluate(scores, train, test)
    assert metrics.accuracy == pytest.approx(accuracy, abs=5e-5)
    assert metrics.coverage == pytest.approx(coverage, abs=5e-5)


@pytest.mark.parametrize(("model", "run", "method", "accuracy", "coverage"), PUBLISHED, ids=lambda v: str(v))
def test_cli_evaluate_official_reproduces_published_metrics(
    shared_data_dir: Path, model: str, run: str, method: str, accuracy: float, coverage: float, capsys
) -> None:
    """The same table through `llm-attr evaluate --scores-format official --json`, as a user runs it."""
    import json

    from llm_attribution.cli import main

    path = shared_data_dir / "official-scores" / model / f"{run}_{method}.csv"
    task_dir = shared_data_dir / "paper-datasets" / run.split("_")[0]
    argv = [
        "evaluate",
        "--scores",
        str(path),
        "--data",
        str(task_dir),
        "--scores-format",
        "official",
        "--json",
    ]
    assert main([*argv, "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert round(result["accuracy"], 4) == pytest.approx(accuracy, abs=1e-9)
    assert round(result["coverage"], 4) == pytest.approx(coverage, abs=1e-9)
