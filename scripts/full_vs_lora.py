"""Are influence functions' failures LoRA artefacts? Fine-tune the same model on the same tasks with LoRA and
with full fine-tuning (every attention and MLP projection) at the same settings, attribute both with the
same methods on projected gradients, and print accuracy and coverage side by side.

    PYTHONPATH=src .venv/bin/python scripts/full_vs_lora.py --out /tmp/full-vs-lora            # embedded
    PYTHONPATH=src .venv/bin/python scripts/full_vs_lora.py --out /tmp/fvl --model tiny --train 30 --test 6

Defaults: the embedded SmolLM2-135M, grammars and the built-in backdoor task, 100 train / 20 test examples,
max length 48, 2 epochs. Learning rates differ on purpose: LoRA's 1e-3 moves a rank-4 update that starts
at zero (scaled by alpha / r = 8); AdamW moves every coordinate by about the learning rate per step, so
full fine-tuning at 1e-3 would shift each of the ~106M pretrained weights (typical size 0.02-0.05) by a
sizeable fraction of itself within a few dozen steps and wreck the model; 2e-5 is inside the usual 1e-5 to
5e-5 range for full fine-tuning of small LMs. Both runs get the same --projection-dim: LoRA's blocks of the
embedded model (4 x 576) are narrower than it and stay exact; full layers are projected to it (LoGra-style).

Each (task, tuning) is one run folder OUT/<task>-<tuning>, reused when rerun with the same settings.
With ``--lds-subsets M`` every run also gets ``llm-attr lds`` with M subsets of half its training set (one
training seed: a full fine-tune retrained 2M times does not fit a 2-core session), and the LDS of every
method is printed beside the proxies, the LoRA and full runs on the same subsets. Resumable: rerun the same
command after a kill.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llm_attribution.cli import main as llm_attr
from llm_attribution.evaluation.statistics import paired_difference


def _run(out: Path, task: str, tuning: str, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    lr = args.lora_lr if tuning == "lora" else args.full_lr
    argv = [
        "run",
        "--task", task,
        "--model", args.model,
        "--train-limit", str(args.train),
        "--test-limit", str(args.test),
        "--max-length", str(args.max_length),
        "--epochs", str(args.epochs),
        "--tuning", tuning,
        "--learning-rate", str(lr),
        "--projection-dim", str(args.projection_dim),
        "--methods", args.methods,
        "--out", str(out),
    ]  # fmt: skip
    if args.method_options:
        argv += ["--method-options", args.method_options]
    if args.quiet:
        argv.append("--quiet")
    code = llm_attr(argv)
    if code != 0:
        sys.exit(f"llm-attr {' '.join(argv)} failed with status {code}")
    results = json.loads((out / "results.json").read_text())
    finetune = json.loads((out / "finetune.json").read_text())
    lds = None
    if args.lds_subsets:
        lds_argv = [
            "lds", "--run", str(out), "--subsets", str(args.lds_subsets), "--ceiling", "false",
            "--methods", args.methods, "--projection-dim", str(args.projection_dim), "--quiet",
        ]  # fmt: skip
        if args.method_options:
            lds_argv += ["--method-options", args.method_options]
        code = llm_attr(lds_argv)
        if code != 0:
            sys.exit(f"llm-attr {' '.join(lds_argv)} failed with status {code}")
        lds = json.loads((out / "lds" / "lds.json").read_text())
    return {
        "lds": lds,
        "methods": results["methods"],
        "features_s": sum(results["timings"].values()),
        "epoch_s": finetune["loss"]["seconds_per_epoch"],
        "loss": finetune["loss"]["epoch_loss"],
    }


def _lds(record: dict, name: str) -> str:  # type: ignore[type-arg]
    entry = record["losses"]["attributed"]["methods"][name]
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def _per_test(record: dict, name: str) -> list[float]:  # type: ignore[type-arg]
    return [
        float("nan") if v is None else v for v in record["losses"]["attributed"]["methods"][name]["per_test"]
    ]


def _lds_pair(got: dict, name: str) -> str:  # type: ignore[type-arg]
    return f"LDS LoRA {_lds(got['lora']['lds'], name)}  full {_lds(got['full']['lds'], name)}"


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--out", type=Path, required=True, help="folder for the run folders")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--tasks", default="grammars,backdoor")
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=2e-5)
    parser.add_argument("--projection-dim", type=int, default=4096)
    parser.add_argument("--methods", default="hessian-free,datainf,exact,repsim")
    parser.add_argument("--method-options", default="", help="passed to run and lds (e.g. lissa.depth=..)")
    parser.add_argument("--lds-subsets", type=int, default=0, help="LDS with this many subsets (0: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    lines = []
    for task in args.tasks.split(","):
        got = {tuning: _run(args.out / f"{task}-{tuning}", task, tuning, args) for tuning in ("lora", "full")}
        sizes = f"{args.train} train, {args.test} test, {args.epochs} epochs"
        lines.append(f"\n{task}: {sizes}, model {args.model}")
        for tuning, result in got.items():
            epochs = ", ".join(f"{s:.1f}" for s in result["epoch_s"])
            losses = " -> ".join(f"{v:.3f}" for v in result["loss"])
            lines.append(
                f"  {tuning:<4}: epoch seconds {epochs}; features {result['features_s']:.1f} s; loss {losses}"
            )
        lines.append(f"  {'method':<14}{'acc LoRA':>10}{'acc full':>10}{'cov LoRA':>10}{'cov full':>10}")
        for method in args.methods.split(","):
            lora, full = got["lora"]["methods"][method], got["full"]["methods"][method]
            lines.append(
                f"  {method:<14}{lora['accuracy']:>10.3f}{full['accuracy']:>10.3f}"
                f"{lora['coverage']:>10.3f}{full['coverage']:>10.3f}"
            )
            if got["lora"]["lds"] is not None:
                lines.append(f"  {'':<14}{_lds_pair(got, method)}")
        if got["lora"]["lds"] is not None:
            for name in ("constant", "label-oracle"):
                lines.append(f"  {name:<14}{_lds_pair(got, name)}")
            lines.append("  full minus LoRA, paired on the same test examples and subsets [95% interval]:")
            for method in args.methods.split(","):
                change = paired_difference(
                    _per_test(got["full"]["lds"], method), _per_test(got["lora"]["lds"], method)
                )
                lines.append(f"  {method:<14}{change.mean:+.3f} [{change.low:+.3f}, {change.high:+.3f}]")
            seconds = [got[t]["lds"]["cost"]["seconds_per_retrain"] for t in ("lora", "full")]
            lines.append(f"  seconds per retrain: LoRA {seconds[0]:.1f}, full {seconds[1]:.1f}")
    print("\n".join(lines))
    print("Scores: higher = the training example supports the test output more.")


if __name__ == "__main__":
    main()
