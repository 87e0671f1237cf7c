"""What collecting gradients inside training costs: a plain ``transformers.Trainer`` + peft fine-tune with
``GradientCaptureCallback`` against the same fine-tune without it, and how the captured gradients agree
with a post-hoc collection.

    python benchmarks/capture.py                      # embedded model, built-in grammars (minutes)
    python benchmarks/capture.py --model tiny         # seconds, to try it

Both arms are the same script: the same base model, data (tokenised by the run's template), LoRA (the
study's: r 4, alpha 32, q_proj and v_proj; dropout as --lora-dropout), seed, batch size and thread count;
the only difference is the callback, which captures every step of the one epoch trained. The arms
alternate (without, with, without, with, ...) so that a change of the machine's load hits both, and each
ratio pairs a run with the one just before it. Agreement: a capture at learning rate 0 (every step sees
the same adapter) against ``collect_features`` at that adapter: the largest relative difference of the
gradient rows, and of Hessian-free (gradient dot product) scores of the test examples.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from llm_attribution.core.progress import set_quiet
from llm_attribution.data.loaders import load_task
from llm_attribution.data.settings import DataSettings
from llm_attribution.data.templates import IGNORE_INDEX, PromptSettings, encode_examples
from llm_attribution.features.captured import Capture
from llm_attribution.features.gradients import GradientSettings, collect_features
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import ModelSettings
from llm_attribution.workflows.capture import GradientCaptureCallback

sys.path.insert(0, str(Path(__file__).parent))
from sections import command_line, write_section


def _pad(pad_id: int):  # type: ignore[no-untyped-def]
    def collate(batch):  # type: ignore[no-untyped-def]
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.tensor([b["input_ids"] + [pad_id] * (width - len(b["input_ids"])) for b in batch])
        labels = torch.tensor([b["labels"] + [IGNORE_INDEX] * (width - len(b["labels"])) for b in batch])
        mask = torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The base model as a user's script has it: a plain float32 model. The embedded model is loaded from
    a GGUF file and keeps its quantisation mark, which the Trainer refuses though its weights are
    dequantised, so its weights go into a model made from the same config without that mark."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict({k: v.to(torch.float32) for k, v in model.state_dict().items()}, strict=True)
    return plain


def _train(  # type: ignore[no-untyped-def]
    args: argparse.Namespace, scratch: Path, capture: Path | None, learning_rate: float, model=None
):
    """One fine-tune as a user's script runs it (of a new adapter, or of ``model``'s further); returns the
    seconds in Trainer.train, the peft model, its tokenizer, the task and the template."""
    loaded = load_model(ModelSettings(model=args.model, device="cpu"))
    task = load_task(DataSettings(task=args.task, train_limit=args.train, test_limit=args.test))
    prompt = PromptSettings(max_length=args.max_length)
    encoded = [
        {"input_ids": list(e.input_ids), "labels": list(e.labels)}
        for e in encode_examples(task.train, loaded.tokenizer, prompt)
    ]
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(_plain(loaded.model), lora) if model is None else model
    training = TrainingArguments(
        output_dir=str(scratch / "trainer"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=learning_rate, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        logging_strategy="no", seed=0,
    )  # fmt: skip
    callbacks = [GradientCaptureCallback(capture)] if capture is not None else []
    trainer = Trainer(
        model=model, args=training, train_dataset=encoded, data_collator=_pad(loaded.tokenizer.pad_token_id),
        callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, model, loaded.tokenizer, task, prompt


def measure(args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    load_before = os.getloadavg()[0]
    plain, captured = [], []
    for repeat in range(args.repeats):
        seconds, trained, *_ = _train(args, scratch, None, 1e-3)
        plain.append(seconds)
        captured.append(_train(args, scratch, scratch / f"capture-{repeat}", 1e-3)[0])
    ratios = [c / p for c, p in zip(captured, plain, strict=True)]
    load_after = os.getloadavg()[0]
    # Agreement: the trained adapter through one more epoch at learning rate 0 with capture (every step
    # sees the same adapter), against a post-hoc collection at that adapter.
    _, model, tokenizer, task, prompt = _train(args, scratch, scratch / "agreement", 0.0, trained)
    capture = Capture.open(scratch / "agreement")
    from_capture = capture.features(task.train, tokenizer, prompt)
    settings = GradientSettings()
    collected = collect_features(model, tokenizer, task.train, prompt, settings, representations=False)
    test = collect_features(model, tokenizer, task.test, prompt, settings, representations=False)
    row_error = max(
        float((from_capture.blocks[n] - rows).norm() / rows.norm()) for n, rows in collected.blocks.items()
    )

    def dot(train: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((test.blocks[n].double() @ train[n].double().T for n in train), torch.zeros(1))  # type: ignore[return-value]

    want, got = dot(collected.blocks), dot(from_capture.blocks)
    return {
        "plain": statistics.median(plain),
        "captured": statistics.median(captured),
        "ratio": statistics.median(ratios),
        "ratios": ratios,  # type: ignore[dict-item]
        "row_error": row_error,
        "score_error": float((got - want).abs().max() / want.abs().max()),
        "examples": len(task.train),
        "distinct": len(capture.keys),
        "load": (load_before, load_after),  # type: ignore[dict-item]
        "blocks": len(collected.blocks),
    }


def report(found: dict[str, float], args: argparse.Namespace, command: str) -> str:
    ratios = ", ".join(f"{r:.3f}" for r in found["ratios"])  # type: ignore[attr-defined]
    return "\n".join(
        [
            "## Collecting gradients inside training: the Trainer callback's overhead",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads. A plain `transformers.Trainer` + peft fine-tune "
            f"of the {args.model} model (LoRA r 4, alpha 32, q_proj and v_proj, dropout "
            f"{args.lora_dropout}) on {args.train} examples of {args.task} (max length {args.max_length}, "
            f"batch {args.batch_size}, one epoch), with and without `GradientCaptureCallback` capturing "
            f"every step ({found['blocks']} LoRA matrices, unprojected), alternated {args.repeats} times. "
            f"Command: `{command}`. The machine's 1-minute load average was {found['load'][0]:.1f} when the "  # type: ignore[index]
            f"timed runs began and {found['load'][1]:.1f} when they ended (above 1, other jobs shared the "  # type: ignore[index]
            "cores: the paired ratios carry that noise).",
            "",
            "| what | value |",
            "|---|---|",
            f"| Trainer.train() without capture (median) | {found['plain']:.2f} s |",
            f"| Trainer.train() with capture (median) | {found['captured']:.2f} s |",
            f"| with / without, each pair (goal: at most 1.10; Bergson's callback ~1.17) | {ratios} |",
            f"| median of the paired ratios | {found['ratio']:.3f}x |",
            f"| captured vs post-hoc gradient rows at the same adapter (largest relative error over blocks) "
            f"| {found['row_error']:.1e} |",
            f"| captured vs post-hoc Hessian-free scores, {args.test} test x {found['examples']} training "
            f"examples (largest error / largest score) | {found['score_error']:.1e} |",
            "",
            f"Agreement: the fine-tuned adapter trained one more epoch at learning rate 0 with the callback "
            f"(every step at the same adapter; {found['distinct']} distinct token sequences among the "
            f"{found['examples']} examples), against `collect_features` at that adapter.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--task", default="grammars")
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    set_quiet(True)
    command = command_line("capture.py", parser, args)
    with tempfile.TemporaryDirectory() as scratch:
        found = measure(args, Path(scratch))
    section = report(found, args, command)
    print(section)
    write_section(Path(args.out), "capture", section)


if __name__ == "__main__":
    main()
