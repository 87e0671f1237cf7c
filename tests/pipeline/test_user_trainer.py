"""A user's own fine-tune, made with no code of ours: a plain ``transformers.Trainer`` with a peft LoRA
adapter on all linear layers (r 8) on chat-format JSONL, then ``llm-attr run --adapter`` explains it. The
adapter's every LoRA matrix is attributed, and a test conversation copied from the training data finds
its own source first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from llm_attribution.evaluation.score_files import read_scores
from llm_attribution.models.tiny import byte_tokenizer, tiny_llama
from llm_attribution.workflows.runs import open_run
from tests.helpers import run_cli


def _conversations(n: int) -> list[dict[str, object]]:
    return [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": f"colour of {'apple' if i % 2 else 'sky'} {i}?"},
                {"role": "assistant", "content": "red" if i % 2 else "blue"},
            ],
            "label": "apple" if i % 2 else "sky",
        }
        for i in range(n)
    ]


def _user_training(base: Path, data: Path, adapter: Path) -> None:
    """What a user's script does: tokenize with the chat template, train with Trainer, save the adapter."""
    tokenizer = byte_tokenizer()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    encoded = []
    for row in rows:
        ids = tokenizer(
            tokenizer.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False
        )
        encoded.append({"input_ids": ids["input_ids"], "labels": ids["input_ids"]})

    def collate(batch):  # type: ignore[no-untyped-def]
        width = max(len(b["input_ids"]) for b in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch])
        mask = torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch])
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    args = TrainingArguments(
        output_dir=str(adapter.parent / "trainer"),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=encoded, data_collator=collate).train()
    model.save_pretrained(str(adapter))


def _user_data(tmp_path: Path) -> tuple[Path, Path]:
    """A base model folder and chat-format JSONL (12 training conversations; 3 test copies of the first)."""
    base = tmp_path / "base"
    tiny_llama(len(byte_tokenizer())).save_pretrained(str(base))
    byte_tokenizer().save_pretrained(str(base))
    data = tmp_path / "data"
    data.mkdir()
    train = _conversations(12)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (data / "test.jsonl").write_text(
        "".join(json.dumps({**r, "id": f"t{i}"}) + "\n" for i, r in enumerate(train[:3]))
    )
    return base, data


def test_an_adapter_from_a_plain_trainer_on_chat_data_is_explained(tmp_path, capsys) -> None:
    base, data = _user_data(tmp_path)
    adapter = tmp_path / "adapter"
    _user_training(base, data / "train.jsonl", adapter)

    out = tmp_path / "run"
    argv = ["run", "--task", str(data), "--model", str(base), "--adapter", str(adapter)]
    code, _, err = run_cli([*argv, "--methods", "hessian-free,repsim", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    recorded = json.loads((out / "settings.json").read_text())["adapter"]["config"]
    assert recorded["r"] == 8 and recorded["peft_type"] == "LORA"
    # every LoRA matrix the user's adapter trained is a block of ours: all-linear on 2 layers is 7 modules
    # a layer, A and B each, 28 matrices
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(saved) == 28
    assert len(open_run(out).weights.modules()) == 28
    repsim = read_scores(out / "scores" / "repsim.safetensors")
    assert torch.equal(repsim.argmax(dim=1), torch.arange(3))  # each copy finds its source
    dot = read_scores(out / "scores" / "hessian-free.safetensors")
    assert dot.shape == (3, 12) and float(dot.abs().sum()) > 0


def _explained_and_traced(base: Path, data: Path, adapter: Path, out: Path, capsys, *extra: str) -> None:  # type: ignore[no-untyped-def]
    """`run --adapter` on the user's adapter, then `trace` of the model's own answers to a prompts file."""
    argv = ["run", "--task", str(data), "--model", str(base), "--adapter", str(adapter), *extra]
    code, _, err = run_cli([*argv, "--methods", "hessian-free,repsim", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    repsim = read_scores(out / "scores" / "repsim.safetensors")
    assert torch.equal(repsim.argmax(dim=1), torch.arange(3))  # each copy finds its source
    prompts = data.parent / "prompts.txt"
    prompts.write_text("colour of apple 1?\ncolour of sky 2?\n")
    trace = ["trace", "--run", str(out), "--prompts", str(prompts), "--methods", "hessian-free", "--top", "3"]
    code, printed, err = run_cli([*trace, "--max-new-tokens", "4", "--quiet", "--json"], capsys)
    assert code == 0, err
    result = json.loads(printed)
    ranked = result["top"]["hessian-free"]
    assert len(result["answers"]) == 2 and len(ranked) == 2  # every answer kept (no --flag), each ranked
    assert all(len(top) == 3 and {e["id"] for e in top} <= {f"c{i}" for i in range(12)} for top in ranked)


def test_an_adapter_from_a_plain_trainer_is_traced(tmp_path, capsys) -> None:
    base, data = _user_data(tmp_path)
    adapter = tmp_path / "adapter"
    _user_training(base, data / "train.jsonl", adapter)
    _explained_and_traced(base, data, adapter, tmp_path / "run", capsys)


def test_an_adapter_from_trl_sft_trainer_on_chat_data_is_explained_and_traced(tmp_path, capsys) -> None:
    """TRL's SFTTrainer as a user runs it: chat JSONL, its own chat templating, collator and loss."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (make install installs it)")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM

    base, data = _user_data(tmp_path)
    dataset = load_dataset("json", data_files=str(data / "train.jsonl"), split="train").remove_columns(
        ["id", "label"]
    )
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, num_train_epochs=2,
        learning_rate=5e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=byte_tokenizer()).train()
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    assert len(load_file(str(adapter / "adapter_model.safetensors"))) == 28
    _explained_and_traced(base, data, adapter, tmp_path / "run", capsys, "--chat-loss", "all")
