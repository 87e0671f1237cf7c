"""Every bad input a user can give, in one table: exit status 2, exactly one line on stderr, no traceback,
and nothing left behind (every file under the test's folder, and the run folder it names, as before).

The command line runs in-process (seconds per case); two cases run as a process of their own to show that
no traceback reaches the terminal there either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_attribution.features import gradients as gradients_module
from llm_attribution.models import resolve as resolve_module
from llm_attribution.models.resolve import embedded_gguf_path
from llm_attribution.models.tiny import byte_tokenizer, tiny_llama
from tests.helpers import run_cli

TINY = ["--model", "tiny", "--train-limit", "20", "--test-limit", "4", "--epochs", "1", "--quiet"]
POISON = "~"  # a character whose embedding the NaN model turns into NaN
HUB_ID = "someone/some-model"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: a connection is refused at once


def _jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _file(path: Path, content: str | bytes) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def _npy(path: Path, shape: tuple[int, int]) -> str:
    np.save(path, np.zeros(shape))
    return str(path)


def _rows(n: int, labels: str = "ab", start: int = 0) -> list[dict[str, str]]:
    return [
        {"id": f"ex-{i}", "prompt": f"say {i}", "response": f"class {labels[i % len(labels)]}"}
        | {"label": labels[i % len(labels)]}
        for i in range(start, start + n)
    ]


def _dataset_folder(folder: Path, poison: str = "") -> str:
    """train.jsonl and test.jsonl; ``poison`` (a split name) gets one more example, 'bad', made of POISON."""
    folder.mkdir()
    for split, rows in (("train", _rows(12)), ("test", _rows(3, start=100))):
        bad = [{**rows[0], "id": "bad", "prompt": POISON}] if split == poison else []
        _jsonl(folder / f"{split}.jsonl", rows + bad)
    return str(folder)


def _chat_folder(folder: Path, bad: object) -> str:
    """Chat-format train/test files whose training example 'bad' has the conversation ``bad``."""
    folder.mkdir()
    for split, n in (("train", 8), ("test", 2)):
        rows = [
            {
                "id": f"{split}-{i}",
                "messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": "ok"}],
                "label": "ab"[i % 2],
            }
            for i in range(n)
        ]
        extra = [{"id": "bad", "messages": bad, "label": "a"}] if split == "train" else []
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    return str(folder)


def _dora_adapter(folder: Path) -> str:
    """A DoRA adapter of the tiny model (its tuner trains magnitude vectors besides the LoRA matrices)."""
    from peft import LoraConfig, get_peft_model

    from llm_attribution.models.resolve import load_model
    from llm_attribution.models.settings import ModelSettings

    base = load_model(ModelSettings(model="tiny", device="cpu")).model
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    get_peft_model(base, config).save_pretrained(str(folder))
    return str(folder)


def _lora_adapter(folder: Path) -> str:
    """A plain LoRA adapter of the tiny model, as a user's script saves it."""
    from peft import LoraConfig, get_peft_model

    from llm_attribution.models.resolve import load_model
    from llm_attribution.models.settings import ModelSettings

    base = load_model(ModelSettings(model="tiny", device="cpu")).model
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(folder)
    )
    return str(folder)


def _capture(folder: Path) -> str:
    """A gradient capture of one training step on two examples that are not the run's."""
    from llm_attribution.data.templates import PromptSettings, collate, encode_examples
    from llm_attribution.models.lora import attach_lora
    from llm_attribution.models.resolve import load_model
    from llm_attribution.models.settings import LoraSettings, ModelSettings
    from llm_attribution.workflows.capture import capture_gradients
    from tests.helpers import toy_task

    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    model = attach_lora(loaded.model, LoraSettings())
    examples = toy_task(n_train=2).train
    batch = collate(
        encode_examples(examples, loaded.tokenizer, PromptSettings()), loaded.tokenizer.pad_token_id
    )
    with capture_gradients(model, folder):
        model(**batch).loss.backward()
    return str(folder)


def _truncated_gguf(path: Path) -> str:
    """The first 2 MB of the embedded model's GGUF file: a real header, then nothing."""
    try:
        source = embedded_gguf_path()
    except Exception:  # without the embedded package, a fake file stands in
        path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
        return str(path)
    with source.open("rb") as handle:
        path.write_bytes(handle.read(2 << 20))
    return str(path)


def _nan_for_poisoned_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model, with NaN hidden states wherever the input holds POISON (a broken model, say)."""
    token = byte_tokenizer().convert_tokens_to_ids(POISON)

    def poisoned(vocab_size: int) -> torch.nn.Module:
        model = tiny_llama(vocab_size)

        def hook(module, inputs, output):  # type: ignore[no-untyped-def]
            return output.masked_fill((inputs[0] == token).unsqueeze(-1), float("nan"))

        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(resolve_module, "tiny_llama", poisoned)


def _nan_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finite losses whose gradients are NaN: ``0 * sqrt(x - x)`` is 0, its derivative ``0 * inf``."""
    original = gradients_module.per_example_losses

    def poisoned(logits, labels):  # type: ignore[no-untyped-def]
        loss, counts = original(logits, labels)
        return loss + 0.0 * (loss - loss.detach()).sqrt(), counts

    monkeypatch.setattr(gradients_module, "per_example_losses", poisoned)


def _dead_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", DEAD_ENDPOINT)


@dataclass(frozen=True)
class Case:
    """A command line made in a fresh folder, the text its one error line must hold, an optional fault."""

    name: str
    argv: Callable[[Path, Path], list[str]]  # (the test's folder, an existing finished run) -> argv
    needle: str | tuple[str, ...]
    fault: Callable[[pytest.MonkeyPatch], None] | None = None
    max_seconds: float | None = None


def _run(tmp: Path, *argv: str) -> list[str]:
    return ["run", *TINY, "--methods", "hessian-free,repsim", *argv, "--out", str(tmp / "out")]


CASES = [
    Case("unknown task", lambda t, r: _run(t, "--task", "no-such-task"), "unknown task"),
    Case("unknown model name", lambda t, r: _run(t, "--model", "no-such-model"), "unknown model"),
    Case(
        "unreachable hub id",
        lambda t, r: _run(t, "--model", HUB_ID),
        ("unreachable", "--model PATH"),
        fault=_dead_hub,
        max_seconds=10,
    ),
    Case("missing path", lambda t, r: _run(t, "--task", str(t / "nope.jsonl")), "no such file"),
    Case(
        "wrong field names",
        lambda t, r: _run(t, "--task", _jsonl(t / "f.jsonl", [{"question": "q", "answer": "a"}] * 4)),
        ("no prompt field", "--prompt-field"),
    ),
    Case("empty dataset", lambda t, r: _run(t, "--task", _jsonl(t / "e.jsonl", [])), "empty"),
    Case(
        "one class",
        lambda t, r: _run(t, "--task", _jsonl(t / "one.jsonl", _rows(12, labels="a"))),
        "1 class(es)",
    ),
    Case(
        "duplicate ids",
        lambda t, r: _run(t, "--task", _jsonl(t / "d.jsonl", _rows(12) + _rows(1))),
        "duplicate example id(s) in row: ex-0",
    ),
    Case(
        "fake GGUF",
        lambda t, r: _run(t, "--model", _file(t / "fake.gguf", b"GGUF not really")),
        "cannot load GGUF file",
    ),
    Case(
        "truncated GGUF",
        lambda t, r: _run(t, "--model", _truncated_gguf(t / "cut.gguf")),
        "cannot load GGUF file",
    ),
    Case("non-numeric option", lambda t, r: _run(t, "--epochs", "abc"), "--epochs"),
    Case("out-of-range option", lambda t, r: _run(t, "--max-length", "0"), "--max-length"),
    Case("unknown method", lambda t, r: _run(t, "--methods", "influence"), "unknown attribution method"),
    Case(
        "attribute on a folder that is not a run",
        lambda t, r: ["attribute", "--run", str(_dataset_folder(t / "data")), "--quiet"],
        "is not a run folder",
    ),
    Case(
        "output path is a file",
        lambda t, r: ["run", *TINY, "--out", _file(t / "file", "x")],
        "is a file",
    ),
    Case(
        "scores of the wrong shape",
        lambda t, r: [
            "evaluate",
            "--scores",
            _npy(t / "s.npy", (3, 5)),
            "--data",
            _dataset_folder(t / "data"),
            "--quiet",
        ],
        "score matrix has shape (3, 5)",
    ),
    Case(
        "malformed official scores",
        lambda t, r: [
            "evaluate",
            "--scores",
            _file(t / "o.csv", "0,1\n0.5,abc\n"),
            "--scores-format",
            "official",
            "--data",
            _dataset_folder(t / "data"),
            "--quiet",
        ],
        "is not a number",
    ),
    Case(
        "NaN loss while fine-tuning",
        lambda t, r: _run(t, "--task", _dataset_folder(t / "data", poison="train")),
        ("non-finite training loss", "example(s) bad;"),
        fault=_nan_for_poisoned_examples,
    ),
    Case(
        "NaN loss while collecting gradients",
        lambda t, r: _run(t, "--task", _dataset_folder(t / "data", poison="test")),
        "non-finite loss for example(s) bad",
        fault=_nan_for_poisoned_examples,
    ),
    Case(
        "NaN gradient",
        lambda t, r: _run(t, "--task", "grammars"),
        ("non-finite gradient", "for example(s) grammars-"),
        fault=_nan_gradients,
    ),
    Case(
        "run folder with other settings",
        lambda t, r: ["run", *TINY, "--learning-rate", "1e-2", "--out", str(r)],
        ("other settings", "learning_rate"),
    ),
    Case(
        "chat example without an assistant turn",
        lambda t, r: _run(t, "--task", _chat_folder(t / "d", [{"role": "user", "content": "hi"}])),
        ("example bad", "no assistant turn"),
    ),
    Case(
        "chat example with an unknown role",
        lambda t, r: _run(t, "--task", _chat_folder(t / "d", [{"role": "robot", "content": "hi"}])),
        ("example bad", "role 'robot'"),
    ),
    Case(
        "chat messages that are not a list",
        lambda t, r: _run(t, "--task", _chat_folder(t / "d", "hello")),
        ("example bad", "non-empty list"),
    ),
    Case(
        "unsupported adapter (DoRA)",
        lambda t, r: _run(t, "--adapter", _dora_adapter(t / "dora")),
        ("DoRA adapter", "supported: peft LoRA adapters"),
    ),
    Case(
        "--captured without --adapter",
        lambda t, r: _run(t, "--captured", str(t / "capture")),
        "--captured goes with --adapter",
    ),
    Case(
        "unknown adapter name in a folder of adapters",
        lambda t, r: _run(t, "--adapter", _lora_adapter(t / "a"), "--adapter-name", "other"),
        "no adapter named 'other'",
    ),
    Case(
        "--captured folder without a capture",
        lambda t, r: _run(t, "--adapter", _lora_adapter(t / "a"), "--captured", str(t)),
        "holds no gradient capture",
    ),
    Case(
        "capture without the run's training examples",
        lambda t, r: _run(t, "--adapter", _lora_adapter(t / "a"), "--captured", _capture(t / "c")),
        ("holds no gradient of training example", "tokenised it otherwise"),
    ),
    Case(
        "capture read with another projection",
        lambda t, r: _run(
            t, "--adapter", _lora_adapter(t / "a"), "--captured", _capture(t / "c"), "--projection-dim", "16"
        ),
        ("made with projection none", "--projection-dim"),
    ),
    Case(
        "damping scale 0",
        lambda t, r: ["diagnose", "spectrum", "--run", str(r), "--damping-scale", "0", "--quiet"],
        "--damping-scale",
    ),
    Case(
        "negative damping scale",
        lambda t, r: ["diagnose", "spectrum", "--run", str(r), "--damping-scale", "-1", "--quiet"],
        "--damping-scale",
    ),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    run = tmp_path_factory.mktemp("finished") / "run"
    from llm_attribution.cli import main

    assert main(["finetune", *TINY, "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    case: Case, finished_run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    argv = case.argv(tmp_path, finished_run)
    if case.fault:
        case.fault(monkeypatch)
    before = snapshot(tmp_path), snapshot(finished_run)
    start = time.perf_counter()
    code, _, err = run_cli(argv, capsys)
    seconds = time.perf_counter() - start
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in (case.needle,) if isinstance(case.needle, str) else case.needle:
        assert needle in lines[0], lines[0]
    assert (snapshot(tmp_path), snapshot(finished_run)) == before  # nothing partial left behind
    if case.max_seconds is not None:
        assert seconds < case.max_seconds, seconds


def test_the_table_covers_every_bad_input_of_the_issue() -> None:
    covered = {c.name for c in CASES}
    assert len(covered) == len(CASES) == 32


def _cli_process(
    argv: list[str], env: dict[str, str], out: Path
) -> tuple[subprocess.CompletedProcess, float]:
    clean = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "llm_attribution", *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean | env,
    )
    return done, time.perf_counter() - start


@pytest.fixture(scope="module")
def start_up_seconds(tmp_path_factory) -> float:  # type: ignore[no-untyped-def]
    """Wall time of a process that fails at once (a bad option) on this machine, at its current load."""
    return _cli_process(["run", *TINY, "--epochs", "abc"], {}, tmp_path_factory.mktemp("baseline") / "o")[1]


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["run", *TINY, "--model", HUB_ID], {"HF_ENDPOINT": DEAD_ENDPOINT}, "unreachable"),
        # through a proxy that does not answer: no half-minute of retries either
        (["run", *TINY, "--model", HUB_ID], {"HTTPS_PROXY": DEAD_ENDPOINT}, "unreachable"),
        (["run", *TINY, "--epochs", "abc"], {}, "--epochs"),
    ],
    ids=["unreachable hub", "dead proxy", "bad option"],
)
def test_a_process_prints_one_line_and_no_traceback(
    argv, env, needle, tmp_path: Path, start_up_seconds
) -> None:
    done, seconds = _cli_process(argv, env, tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert needle in done.stderr
    assert not (tmp_path / "out").exists()
    # Measured against the start-up of the interpreter and torch on this machine now (a loaded machine
    # slows both alike): the hub's own retries would add about 45 s.
    assert seconds < start_up_seconds + 25, (seconds, start_up_seconds)
