"""First speed benchmarks on the embedded model (``make bench``).

1. Gradient collection vs training: seconds per example of collecting per-example LoRA gradients
   (batched) divided by seconds per example of a LoRA training step, same batch size, same examples.
2. Scoring 900 x 100 with each method on gradient blocks shaped like the embedded model's LoRA blocks,
   and the study's per-(test, train, block) Python loop for DataInf, timed on a few test examples and
   extrapolated to 100.

Prints a Markdown report and writes it to ``docs/benchmarks.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

from llm_attribution.attribution.base import get_method
from llm_attribution.data import DataSettings, load_task
from llm_attribution.data.templates import PromptSettings, collate, encode_examples
from llm_attribution.features.gradients import GradientSettings, collect_features, lora_modules
from llm_attribution.models.lora import attach_lora, lora_parameters
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import LoraSettings, ModelSettings
from llm_attribution.progress import set_quiet

BATCH = 8
PROMPT = PromptSettings(max_length=64)


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def gradient_vs_training(n_examples: int) -> dict[str, float]:
    loaded = load_model(ModelSettings(model="embedded", device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings(lora_dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter: B non-zero so every block has gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    examples = load_task(DataSettings(task="grammars", train_limit=n_examples)).train
    encoded = encode_examples(examples, loaded.tokenizer, PROMPT)
    params = list(lora_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    batches = [encoded[i : i + BATCH] for i in range(0, len(encoded), BATCH)]

    def train_pass() -> float:
        model.train()
        start = time.perf_counter()
        for rows in batches:
            loss = model(**collate(rows, loaded.tokenizer.pad_token_id)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    def gradient_pass() -> float:
        start = time.perf_counter()
        collect_features(
            model, loaded.tokenizer, examples, PROMPT, GradientSettings(gradient_batch_size=BATCH)
        )
        return time.perf_counter() - start

    train_pass(), gradient_pass()  # warm-up: first passes allocate and pick kernels
    train_s = min(train_pass() for _ in range(2))
    grad_s = min(gradient_pass() for _ in range(2))
    shapes = {name: m.weight.numel() for name, m in lora_modules(model).items()}
    return {
        "train_s_per_example": train_s / len(examples),
        "grad_s_per_example": grad_s / len(examples),
        "n": len(examples),
        "blocks": len(shapes),
        "params": sum(shapes.values()),
        "shapes": shapes,
    }


def scoring(shapes: dict[str, int], n_train: int, n_test: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    train = {k: torch.randn(n_train, d, generator=generator) for k, d in shapes.items()}
    test = {k: torch.randn(n_test, d, generator=generator) for k, d in shapes.items()}
    timings = {}
    for name in ("hessian-free", "datainf", "exact", "lissa-study", "lissa"):
        method = get_method(name)
        start = time.perf_counter()
        method.score(train, test)  # type: ignore[attr-defined]
        timings[name] = time.perf_counter() - start
    return timings


def study_loop_datainf(shapes: dict[str, int], n_train: int, n_test_timed: int) -> float:
    """The study's structure: Python loops over test examples, blocks and training examples."""
    generator = torch.Generator().manual_seed(0)
    train = {k: torch.randn(n_train, d, generator=generator) for k, d in shapes.items()}
    test = {k: torch.randn(n_test_timed, d, generator=generator) for k, d in shapes.items()}
    start = time.perf_counter()
    for t in range(n_test_timed):
        for name, g in train.items():
            lam = 0.1 * float((g**2).mean())
            v = test[name][t]
            hvp = torch.zeros_like(v)
            for i in range(n_train):
                gi = g[i]
                hvp += (v - (gi @ v) / (lam + gi @ gi) * gi) / lam
            hvp /= n_train
            for i in range(n_train):
                _ = float(hvp @ g[i])
    return (time.perf_counter() - start) / n_test_timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=96, help="examples timed for gradients vs training")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    set_quiet(True)
    g = gradient_vs_training(args.examples)
    ratio = g["grad_s_per_example"] / g["train_s_per_example"]
    s = scoring(g["shapes"], 900, 100)
    loop_per_test = study_loop_datainf(g["shapes"], 900, 1)
    loop_total = loop_per_test * 100
    today = datetime.date.today().isoformat()
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` (`python benchmarks/bench.py`) on {today}, on {machine()}.",
        "",
        "## Gradient collection vs training",
        "",
        "Embedded SmolLM2-135M, LoRA r=4 on q/v, built-in grammars task, max length 64.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| training step, seconds per example (batch {BATCH}) | {g['train_s_per_example']:.4f} |",
        f"| per-example gradients, seconds per example (batch {BATCH}) | {g['grad_s_per_example']:.4f} |",
        f"| ratio gradients / training (goal <= 1.1) | {ratio:.2f} |",
        f"| LoRA blocks / parameters per example | {g['blocks']} / {g['params']} |",
        "",
        f"Best of 2 passes over {g['n']} examples after a warm-up pass.",
        "",
        "## Scoring 900 training x 100 test examples (blocks shaped like the embedded model's LoRA)",
        "",
        "| method | seconds |",
        "|---|---|",
        *[f"| {name} | {seconds:.2f} |" for name, seconds in s.items()],
        f"| study-style DataInf loop (per test example x block x training example) | {loop_total:.0f} "
        f"(extrapolated: {loop_per_test:.1f} s per test example) |",
        "",
        f"DataInf speed-up over the study-style loop: {loop_total / s['datainf']:.0f}x. "
        "`lissa` runs its default depth (100) without converging (see docs/results); "
        "`lissa-study` is the official 3-step recursion.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
