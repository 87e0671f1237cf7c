"""Gradients captured inside a training loop (a plain torch loop, a ``transformers.Trainer``) are the
per-example gradients a post-hoc collection gives at the same adapter state, whatever the loop divides its
loss by; ``llm-attr run --adapter --captured`` scores them exactly as it scores collected ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from llm_attribution.core.errors import ConfigError
from llm_attribution.data.templates import PromptSettings, collate, encode_examples
from llm_attribution.evaluation.score_files import read_scores
from llm_attribution.features.captured import Capture
from llm_attribution.features.gradients import GradientSettings, collect_features
from llm_attribution.models.lora import attach_lora
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from llm_attribution.models.tiny import byte_tokenizer, tiny_llama
from llm_attribution.workflows.capture import GradientCaptureCallback, capture_gradients
from tests.helpers import run_cli, toy_task

PROMPT = PromptSettings(max_length=40)


@pytest.fixture()
def model_and_batches():  # type: ignore[no-untyped-def]
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings(lora_dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter: B away from zero, so every block has a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    examples = toy_task(n_train=10).train
    encoded = encode_examples(examples, loaded.tokenizer, PROMPT)
    batches = [collate(encoded[i : i + 4], loaded.tokenizer.pad_token_id) for i in range(0, 10, 4)]
    return model, loaded.tokenizer, examples, batches


@pytest.mark.parametrize("settings", [GradientSettings(), GradientSettings(projection_dim=16)])
def test_captured_rows_are_the_collected_rows_whatever_the_loss_is_divided_by(
    model_and_batches, settings, tmp_path
) -> None:
    model, tokenizer, examples, batches = model_and_batches
    model.train()
    with capture_gradients(model, tmp_path / "capture", settings):
        for i, batch in enumerate(batches):
            out = model(**batch)
            if i == 0:
                loss = out.loss  # Hugging Face's mean over the batch's tokens
            elif i == 1:
                loss = out.loss / 3  # gradient accumulation over 3 micro-batches
            else:  # a mean of per-example means: every example its own alpha
                logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
                token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
                mask = labels != -100
                loss = ((token * mask).sum(1) / mask.sum(1)).mean()
            loss.backward()
            model.zero_grad()
    captured = Capture.open(tmp_path / "capture").features(examples, tokenizer, PROMPT)
    collected = collect_features(model, tokenizer, examples, PROMPT, settings, representations=False)
    assert captured.blocks.keys() == collected.blocks.keys() and len(captured.blocks) == 8
    for name, rows in collected.blocks.items():
        assert rows.abs().max() > 0
        torch.testing.assert_close(captured.blocks[name], rows, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(captured.losses, collected.losses, rtol=1e-5, atol=1e-6)
    assert captured.shapes == collected.shapes


def test_a_loss_that_is_not_token_cross_entropy_is_refused(model_and_batches, tmp_path) -> None:
    model, _, _, batches = model_and_batches
    refused = pytest.raises(ConfigError, match="not a multiple of each example's token cross-entropy")
    with refused, capture_gradients(model, tmp_path / "capture"):
        out = model(**batches[0])
        logits, labels = out.logits[:, :-1], batches[0]["labels"][:, 1:]
        smoothed = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, label_smoothing=0.1, ignore_index=-100
        )
        smoothed.backward()
    assert not (tmp_path / "capture").exists()  # nothing partial left behind


def _trainer_setup(tmp_path: Path, n: int = 12) -> tuple[Path, Path, list[dict[str, object]]]:
    """A base model folder, and a dataset in our template's tokens (a user script that tokenises with the
    run's template: the capture finds each example by its tokens)."""
    base = tmp_path / "base"
    tiny_llama(len(byte_tokenizer())).save_pretrained(str(base))
    byte_tokenizer().save_pretrained(str(base))
    data = tmp_path / "data"
    data.mkdir()
    rows: list[dict[str, object]] = [
        {"id": f"e{i}", "prompt": f"colour of {fruit} {i}?", "response": colour, "label": fruit}
        for i, (fruit, colour) in enumerate([("apple", "red"), ("sky", "blue")] * (n // 2))
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text(
        "".join(json.dumps({**r, "id": f"t{i}"}) + "\n" for i, r in enumerate(rows[:3]))
    )
    return base, data, rows


def _user_model(base: Path):  # type: ignore[no-untyped-def]
    """The user's peft model: LoRA on all linear layers, dropout 0, B away from zero (every block has a
    gradient from the first step)."""
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def _captured_scores_equal_collected(  # type: ignore[no-untyped-def]
    tmp_path: Path, base: Path, data: Path, capture: Path, methods: list[str], capsys
) -> None:
    """`run --adapter --captured` scores every method as `run --adapter` does (collected after training)."""
    adapter = tmp_path / "adapter"
    common = ["--task", str(data), "--model", str(base), "--adapter", str(adapter)]
    common += ["--methods", ",".join(methods), "--quiet"]
    code, _, err = run_cli(["run", *common, "--captured", str(capture), "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["run", *common, "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    for method in methods:
        got = read_scores(tmp_path / "a" / "scores" / f"{method}.safetensors")
        want = read_scores(tmp_path / "b" / "scores" / f"{method}.safetensors")
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * float(want.abs().max()))


def _train(
    base: Path, data: Path, adapter: Path, callback: GradientCaptureCallback, **arguments: object
) -> None:
    from llm_attribution.data.loaders import load_task
    from llm_attribution.data.settings import DataSettings

    tokenizer = byte_tokenizer()
    task = load_task(DataSettings(task=str(data)))
    encoded = [
        {"input_ids": list(e.input_ids), "labels": list(e.labels)}
        for e in encode_examples(task.train, tokenizer, PromptSettings())
    ]

    def pad(batch):  # type: ignore[no-untyped-def]
        width = max(len(b["input_ids"]) for b in batch)
        fill = tokenizer.pad_token_id
        ids = torch.tensor([b["input_ids"] + [fill] * (width - len(b["input_ids"])) for b in batch])
        labels = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
        mask = torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    model = _user_model(base)
    settings = {"per_device_train_batch_size": 4, "num_train_epochs": 2, "learning_rate": 5e-3, **arguments}
    args = TrainingArguments(
        output_dir=str(adapter.parent / "trainer"), report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, **settings,  # type: ignore[arg-type]
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=encoded, data_collator=pad, callbacks=[callback]).train()
    model.save_pretrained(str(adapter))


def test_a_trainer_capture_scores_as_a_collection_after_training(tmp_path, capsys) -> None:
    """At learning rate 0 every step sees the saved adapter: captured and collected scores must agree."""
    base, data, _ = _trainer_setup(tmp_path)
    adapter, capture = tmp_path / "adapter", tmp_path / "capture"
    _train(
        base,
        data,
        adapter,
        GradientCaptureCallback(capture),
        learning_rate=0.0,
        gradient_accumulation_steps=2,
    )
    assert Capture.open(capture).about["examples"] == 12  # the whole last epoch
    _captured_scores_equal_collected(
        tmp_path, base, data, capture, ["hessian-free", "datainf", "exact"], capsys
    )
    # the Python API reads the same capture into a run of its own and scores it the same
    from llm_attribution import api

    config = api.FinetuneConfig(
        data=api.DataSettings(task=str(data)), model=api.ModelSettings(model=str(base), device="cpu")
    )
    run = api.adapter_run(config, tmp_path / "api", adapter, captured=capture)
    api.attribute(run, ["hessian-free"])
    torch.testing.assert_close(
        read_scores(run / "scores" / "hessian-free.safetensors"),
        read_scores(tmp_path / "a" / "scores" / "hessian-free.safetensors"),
    )


def test_a_trainer_capture_of_chosen_steps_and_its_errors(tmp_path, capsys) -> None:
    base, data, _ = _trainer_setup(tmp_path)
    adapter, capture = tmp_path / "adapter", tmp_path / "capture"
    _train(base, data, adapter, GradientCaptureCallback(capture, steps=(2,)))
    found = Capture.open(capture)
    assert found.about["examples"] == 4 and found.about["steps"] == [2, 2]  # one batch of 4, at step 2
    argv = ["run", "--task", str(data), "--model", str(base), "--adapter", str(adapter), "--quiet"]
    code, _, err = run_cli([*argv, "--captured", str(capture), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "holds no gradient of training example" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(
        [
            "run",
            "--task",
            str(data),
            "--model",
            str(base),
            "--captured",
            str(capture),
            "--out",
            str(tmp_path / "r2"),
        ],
        capsys,
    )
    assert code == 2 and "--captured goes with --adapter" in err


def test_a_trl_sft_trainer_capture_scores_as_a_collection_after_training(tmp_path, capsys) -> None:
    """TRL's SFTTrainer (its own collator and loss path), pre-tokenised data, learning rate 0."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (make install installs it)")
    from datasets import Dataset

    from llm_attribution.data.loaders import load_task
    from llm_attribution.data.settings import DataSettings

    base, data, _ = _trainer_setup(tmp_path)
    tokenizer = byte_tokenizer()
    task = load_task(DataSettings(task=str(data)))
    tokens = [list(e.input_ids) for e in encode_examples(task.train, tokenizer, PromptSettings())]
    model = _user_model(base)
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, num_train_epochs=1,
        learning_rate=0.0,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, max_length=None,
        bf16=False,  # TRL's default is a bf16 pass, whose gradients are bf16-rounded: compare in float32
    )  # fmt: skip
    capture, adapter = tmp_path / "capture", tmp_path / "adapter"
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": tokens}),
        processing_class=tokenizer, callbacks=[GradientCaptureCallback(capture)],
    )  # fmt: skip
    trainer.train()
    model.save_pretrained(str(adapter))
    assert Capture.open(capture).about["examples"] == 12
    _captured_scores_equal_collected(tmp_path, base, data, capture, ["hessian-free"], capsys)
