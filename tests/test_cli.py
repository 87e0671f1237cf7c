"""The command line: every user error is one line on stderr and exit status 2; finetune end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_attribution.cli import main
from tests.helpers import run_cli

TINY = [
    "--model",
    "tiny",
    "--epochs",
    "2",
    "--train-limit",
    "30",
    "--test-limit",
    "6",
    "--max-length",
    "64",
    "--quiet",
]


def _bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    (tmp / "empty.jsonl").write_text("")
    (tmp / "fields.jsonl").write_text('{"question": "q", "answer": "a", "label": "x"}\n' * 4)
    (tmp / "a_file").write_text("x")
    (tmp / "fake.gguf").write_bytes(b"GGUF but not really")
    out = str(tmp / "run")
    return [
        ("unknown task", ["--task", "nope", "--out", out], "unknown task"),
        ("unknown model", ["--model", "nope", "--out", out], "unknown model"),
        ("missing file", ["--task", str(tmp / "missing.jsonl"), "--out", out], "missing.jsonl"),
        ("wrong fields", ["--task", str(tmp / "fields.jsonl"), "--out", out], "prompt"),
        ("empty data", ["--task", str(tmp / "empty.jsonl"), "--out", out], "empty"),
        ("fake gguf", ["--model", str(tmp / "fake.gguf"), "--out", out], "GGUF"),
        ("epochs abc", ["--epochs", "abc", "--out", out], "--epochs"),
        ("max length 0", ["--max-length", "0", "--out", out], "--max-length"),
        ("bad choice", ["--template", "alpaca", "--out", out], "--template"),
        ("negative lr", ["--learning-rate", "-1", "--out", out], "--learning-rate"),
        ("out is a file", ["--out", str(tmp / "a_file")], "is a file"),
        ("no --out", [], "--out"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_input_is_one_line_and_exit_2(case: int, tmp_path, capsys) -> None:
    name, argv, needle = _bad_inputs(tmp_path)[case]
    base = ["finetune", "--model", "tiny", "--quiet"]
    code, _out, err = run_cli(base + argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (name, err)
    assert len(lines) == 1, (name, err)
    assert needle in lines[0], (name, lines[0])
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists() or name == "out is a file", name


def test_unknown_subcommand_is_one_line(capsys) -> None:
    code, _, err = run_cli(["explode"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_finetune_tiny_end_to_end(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code, out, err = run_cli(
        [
            "finetune",
            "--task",
            "grammars",
            *TINY,
            "--learning-rate",
            "3e-3",
            "--out",
            str(run),
            "--show",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    assert "loss fell" in out and "before:" in out and "after:" in out
    settings = json.loads((run / "settings.json").read_text())
    assert settings["train"]["epochs"] == 2 and settings["model"]["model"] == "tiny"
    loss = json.loads((run / "finetune.json").read_text())["loss"]["epoch_loss"]
    assert loss[1] < loss[0]
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["epoch-1", "epoch-2"]
    data = json.loads((run / "data.json").read_text())
    assert len(data["train_ids"]) == 30 and len(data["test_ids"]) == 6

    # Same command again: reused, not retrained; other settings: refused with one line.
    code, out, _ = run_cli(
        ["finetune", "--task", "grammars", *TINY, "--learning-rate", "3e-3", "--out", str(run)], capsys
    )
    assert code == 0 and "reused" in out
    code, _, err = run_cli(
        ["finetune", "--task", "grammars", *TINY, "--learning-rate", "1e-3", "--out", str(run)], capsys
    )
    assert code == 2 and "learning_rate" in err and len(err.strip().splitlines()) == 1


def test_console_script_prints_no_traceback(tmp_path) -> None:
    exe = Path(sys.executable).with_name("llm-attr")
    result = subprocess.run(
        [str(exe), "finetune", "--epochs", "abc", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_help_states_the_score_convention(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "higher = the training example supports the test output more" in text


@pytest.mark.shared
def test_finetune_on_the_studys_grammars_with_tiny(shared_data_dir, tmp_path, capsys) -> None:
    run = tmp_path / "g"
    code, _out, err = run_cli(
        [
            "finetune",
            "--task",
            str(shared_data_dir / "paper-datasets" / "grammars"),
            "--model",
            "tiny",
            "--epochs",
            "3",
            "--train-limit",
            "200",
            "--learning-rate",
            "3e-3",
            "--quiet",
            "--out",
            str(run),
        ],
        capsys,
    )
    assert code == 0, err
    loss = json.loads((run / "finetune.json").read_text())["loss"]["epoch_loss"]
    assert len(loss) == 3 and loss[2] < loss[0]
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["epoch-1", "epoch-2", "epoch-3"]
