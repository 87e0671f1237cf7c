"""Chat-format data: conversations load from JSONL into examples that keep them, the model's chat template
renders them, and the loss counts exactly the assistant turns (their end-of-turn markers included), in
every turn of a multi-turn chat; a run on them trains and attributes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_attribution.data.loaders import load_task
from llm_attribution.data.settings import DataSettings
from llm_attribution.data.templates import IGNORE_INDEX, PromptSettings, encode_example
from llm_attribution.evaluation.score_files import read_scores
from llm_attribution.models.tiny import byte_tokenizer
from llm_attribution.workflows.explain import ExplainSettings, explain
from tests.helpers import run_cli

END = "</s>\n"  # the tiny model's chat template ends every turn with this


def _chat(i: int, turns: int = 1, system: bool = True) -> dict[str, object]:
    messages: list[dict[str, str]] = [{"role": "system", "content": "be brief"}] if system else []
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"q{i}.{t} {'apple' if i % 2 else 'river'}"},
            {"role": "assistant", "content": f"a{i}.{t} {'red' if i % 2 else 'blue'}"},
        ]
    return {"id": f"c{i}", "messages": messages, "label": "odd" if i % 2 else "even"}


def _folder(root: Path, n_train: int = 12, n_test: int = 3, turns: int = 1, system: bool = True) -> Path:
    root.mkdir()
    (root / "train.jsonl").write_text(
        "".join(json.dumps(_chat(i, turns, system)) + "\n" for i in range(n_train))
    )
    test = [_chat(i, turns, system) for i in range(n_test)]  # copies of training conversations
    (root / "test.jsonl").write_text(
        "".join(json.dumps({**r, "id": f"t{k}"}) + "\n" for k, r in enumerate(test))
    )
    return root


def test_a_multi_turn_chat_is_labelled_on_its_assistant_turns(tmp_path) -> None:
    task = load_task(DataSettings(task=str(_folder(tmp_path / "d", turns=2))))
    example = task.train[1]
    assert [role for role, _ in example.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert example.response == "a1.1 red" and example.prompt.endswith("user: q1.1 apple")
    tokenizer = byte_tokenizer()
    encoded = encode_example(example, tokenizer, PromptSettings(max_length=512))
    labelled = [
        t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(labelled) == f"a1.0 red{END}a1.1 red{END}"  # both answers, nothing else
    # the "prompt" ends with the generation prompt of the last answer: RepSim reads the state there
    prompt_text = tokenizer.decode(list(encoded.input_ids[: encoded.prompt_length]))
    assert prompt_text.endswith("<|im_start|>assistant\n") and "a1.0 red" in prompt_text
    whole = encode_example(example, tokenizer, PromptSettings(max_length=512, chat_loss="all"))
    assert whole.input_ids == encoded.input_ids and IGNORE_INDEX not in whole.labels


def test_a_run_on_chat_data_trains_and_finds_the_copied_conversation(tmp_path, capsys) -> None:
    data = _folder(tmp_path / "d")
    out = tmp_path / "run"
    argv = ["run", "--task", str(data), "--model", "tiny", "--epochs", "3", "--learning-rate", "1e-2"]
    code, _, err = run_cli([*argv, "--methods", "hessian-free,repsim", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    loss = json.loads((out / "finetune.json").read_text())["loss"]["epoch_loss"]
    assert loss[-1] < loss[0]
    repsim = read_scores(out / "scores" / "repsim.safetensors")
    # each test conversation is a copy of training conversation k: its representation is the same
    assert torch.equal(repsim.argmax(dim=1), torch.arange(3))
    assert repsim.shape == (3, 12)
    assert read_scores(out / "scores" / "hessian-free.safetensors").shape == (3, 12)


def test_a_new_prompt_on_a_chat_run_is_a_conversation_too(tmp_path, capsys) -> None:
    """A training chat's own turns, explained, find it at cosine 1: the query is rendered by the chat
    template as the training examples are (through the study template it would look different)."""
    data = _folder(tmp_path / "d", n_train=12, n_test=2, system=False)
    out = tmp_path / "run"
    argv = ["run", "--task", str(data), "--model", "tiny", "--epochs", "1", "--methods", "repsim"]
    code, _, err = run_cli([*argv, "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    user, assistant = _chat(3, system=False)["messages"]  # type: ignore[misc]
    settings = ExplainSettings(
        prompt=user["content"], response=assistant["content"], methods=("repsim",), top=1
    )
    [best] = explain(out, settings).top["repsim"]
    assert best.id == "c3" and best.score == pytest.approx(1.0, abs=1e-5)
