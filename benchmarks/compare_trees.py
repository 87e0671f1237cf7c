"""Scoring speed of two source trees of this project, measured in turns on the same machine (paired).

A refactor's speed is judged against the code before it, not against figures measured on another day:
each round runs one fresh process per tree (old, new, then new, old), each timing every method on the
same synthetic gradients, shaped like the embedded SmolLM2-135M's LoRA blocks (900 train x 100 test,
as in ``bench.py``). Per method it prints both trees' best time and their ratio.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/compare_trees.py /tmp/before/src src --rounds 2 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

METHODS = (
    "hessian-free",
    "datainf",
    "exact",
    "ekfac-example",
    "lissa-study",
    "lissa",
    "hessian-free+bf16",
    "datainf+bf16",
)
LAYERS = 30  # the embedded model: r = 4 on q_proj (576 -> 576) and v_proj (576 -> 192)
MATRICES = {
    **{f"layers.{i}.q.lora_A": (4, 576) for i in range(LAYERS)},
    **{f"layers.{i}.q.lora_B": (576, 4) for i in range(LAYERS)},
    **{f"layers.{i}.v.lora_A": (4, 576) for i in range(LAYERS)},
    **{f"layers.{i}.v.lora_B": (192, 4) for i in range(LAYERS)},
}


def child(methods: list[str], n_train: int, n_test: int, repeats: int) -> dict[str, float]:
    """Best seconds of each method's in-memory scoring, in this process's source tree."""
    import torch

    from llm_attribution.attribution import get_method

    generator = torch.Generator().manual_seed(0)
    train = {k: torch.randn(n_train, o * i, generator=generator) for k, (o, i) in MATRICES.items()}
    test = {k: torch.randn(n_test, o * i, generator=generator) for k, (o, i) in MATRICES.items()}
    best = {}
    for name in methods:
        base, _, low = name.partition("+")
        method = get_method(base, **({"product_dtype": "bfloat16"} if low else {})).bind_shapes(MATRICES)
        seconds = []
        for _ in range(1 if base == "lissa" else repeats):
            start = time.perf_counter()
            method.score(train, test)  # type: ignore[attr-defined]
            seconds.append(time.perf_counter() - start)
        best[name] = min(seconds)
    return best


def run_tree(src: Path, methods: list[str], args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "LLM_ATTR_QUIET": "1"}
    command = [
        sys.executable,
        __file__,
        "--child",
        ",".join(methods),
        "--n-train",
        str(args.n_train),
        "--n-test",
        str(args.n_test),
        "--repeats",
        str(args.repeats),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old", type=Path, nargs="?", help="the src/ folder of the code before")
    parser.add_argument("new", type=Path, nargs="?", help="the src/ folder of the code after")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (old, new, new, old)")
    parser.add_argument("--repeats", type=int, default=2, help="timings per method in a process (best kept)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n-train", type=int, default=900)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="write the table into this file's section")
    parser.add_argument("--label", default="", help="what the two trees are, for the section's text")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child.split(","), args.n_train, args.n_test, args.repeats)))
        return
    methods = args.methods.split(",")
    best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
    for round_ in range(args.rounds):
        for side in ("old", "new", "new", "old"):
            times = run_tree(getattr(args, side), methods, args)
            for name, seconds in times.items():
                best[side][name] = min(best[side].get(name, float("inf")), seconds)
            print(
                f"round {round_ + 1} {side}: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()),
                flush=True,
            )
    table = ["| method | before, s | after, s | after / before |", "|---|---:|---:|---:|"]
    for name in methods:
        old, new = best["old"][name], best["new"][name]
        table.append(f"| {name} | {old:.2f} | {new:.2f} | {new / old:.2f} |")
    print("\n" + "\n".join(table))
    if args.out is not None:
        from sections import write_section

        command = (
            f"python benchmarks/compare_trees.py OLD/src src --rounds {args.rounds} --repeats {args.repeats}"
        )
        body = (
            f"## Before and after a change, paired: {args.label or 'two source trees'}\n\n"
            f"Measured by `{command}` on {datetime.date.today()}, on {platform.machine()}, "
            f"{os.cpu_count()} CPU cores: in-memory scoring of {args.n_test} test x {args.n_train} training "
            "examples on synthetic gradients shaped like the embedded model's 120 LoRA blocks, each tree in "
            f"fresh processes taken in turns (old, new, new, old; {args.rounds} round(s)), best time per "
            "method (lissa timed once per process). Turns make the ratio a like-for-like comparison on a "
            "machine whose speed drifts: the absolute times are this day's machine, not the bench section's."
            "\n\n" + "\n".join(table)
        )
        write_section(args.out, "compare-trees", body)


if __name__ == "__main__":
    main()
