"""A user's own fine-tune, made with no code of ours: a plain ``transformers.Trainer`` with a peft LoRA
adapter on all linear layers (r 8) on chat-format JSONL, then ``llm-attr run --adapter`` explains it. The
adapter's every LoRA matrix is attributed, and a test conversation copied from the training data finds
its own source first."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_an_adapter_from_a_plain_trainer_on_chat_data_is_explained(tmp_path, capsys) -> None:
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
