"""One ``llm-attr run`` in 1 process and under ``torchrun --nproc-per-node N`` (gloo on CPU): wall time, the
time of each stage, and how far the N-process scores are from the 1-process ones.

    .venv/bin/python benchmarks/distributed.py --processes 2 --train 200 --test 20 --epochs 2 [--json OUT]

Three configurations: 1 process with torch's default thread count, 1 process with 1 thread, and N processes
(torchrun gives each 1 thread). The 1-thread process is the like-for-like baseline for N 1-thread processes;
the default one is what a user gets without torchrun. Runs alternate ``--repeats`` times so that a change in
machine load hits every configuration alike; medians are reported. Stage times come from the runs' own
records (finetune.json, results.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from sections import write_section

METHODS = ("hessian-free", "datainf", "lissa", "exact", "repsim")


def run_once(folder: Path, processes: int, threads: str | None, args: list[str]) -> dict[str, float]:
    shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "LLM_ATTR_QUIET": "1"}
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    command = [sys.executable, "-m", "llm_attribution"]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        command += [str(processes), "-m", "llm_attribution"]
    start = time.perf_counter()
    subprocess.run(
        [*command, "run", *args, "--out", str(folder)],
        check=True,
        capture_output=True,
        env=env,
    )
    wall = time.perf_counter() - start
    finetune = json.loads((folder / "finetune.json").read_text())
    results = json.loads((folder / "results.json").read_text())
    return {
        "wall_s": wall,
        "finetune_s": finetune["seconds"],
        "features_s": sum(results["timings"].values()),
        "scoring_s": sum(row["seconds"] for row in results["methods"].values()),
    }


def score_difference(a: Path, b: Path) -> float:
    """Largest relative Frobenius difference between the two runs' score matrices, over methods."""
    worst = 0.0
    for method in METHODS:
        x = load_file(str(a / "scores" / f"{method}.safetensors"))["scores"]
        y = load_file(str(b / "scores" / f"{method}.safetensors"))["scores"]
        worst = max(worst, float((x - y).norm() / x.norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--task", default="grammars")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-default-threads",
        action="store_true",
        help="leave out the 1-process run with torch's default threads (very slow on a busy machine)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--out", type=Path, default=None, help="put a Markdown section into this file")
    options = parser.parse_args()
    args = ["--task", options.task, "--model", options.model, "--train-limit", str(options.train)]
    args += ["--test-limit", str(options.test), "--epochs", str(options.epochs), "--device", "cpu"]
    args += ["--methods", ",".join(METHODS), "--quiet"]
    configurations = {
        "1 process": (1, None),
        "1 process, 1 thread": (1, "1"),
        f"{options.processes} processes": (options.processes, None),
    }
    if options.skip_default_threads:
        del configurations["1 process"]
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in configurations}
    with tempfile.TemporaryDirectory(prefix="llm-attr-dist-") as tmp:
        for _ in range(options.repeats):
            for index, (name, (processes, threads)) in enumerate(configurations.items()):
                timings[name].append(run_once(Path(tmp) / f"c{index}", processes, threads, args))
        last = len(configurations) - 1
        difference = score_difference(Path(tmp) / "c0", Path(tmp) / f"c{last}")
    median = {c: {k: statistics.median(t[k] for t in runs) for k in runs[0]} for c, runs in timings.items()}
    record: dict[str, Any] = {
        "command": f"llm-attr run {' '.join(args)}",
        "default_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "median_seconds": median,
        "max_relative_score_difference": difference,
    }
    print(f"{'seconds':<12}" + "".join(f"{name:>22}" for name in configurations))
    for key in next(iter(median.values())):
        print(f"{key:<12}" + "".join(f"{median[name][key]:>22.1f}" for name in configurations))
    print(
        f"largest relative score difference, {options.processes} processes vs 1: {difference:.1e}; "
        f"default threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}"
    )
    if options.json:
        options.json.write_text(json.dumps(record, indent=2) + "\n")
    if options.out:
        write_section(options.out, "distributed", markdown(record, options, list(configurations)))


def markdown(record: dict[str, Any], options: argparse.Namespace, names: list[str]) -> str:
    """The section of docs/benchmarks.md: stage times per configuration, speed-up, score agreement."""
    median = record["median_seconds"]
    one, many = names[-2] if len(names) > 2 else names[0], names[-1]
    flags = f"--model {options.model} --task {options.task} --train {options.train} --test {options.test}"
    flags += f" --epochs {options.epochs} --repeats {options.repeats}"
    flags += " --skip-default-threads" if options.skip_default_threads else ""
    lines = [
        f"## Several processes: `torchrun --nproc-per-node {options.processes}` (gloo, CPU)",
        "",
        f"Measured by `make bench` (`python benchmarks/distributed.py {flags}`) on "
        f"{datetime.date.today().isoformat()}, {record['cpus']} CPU cores, torch {torch.__version__}, load "
        f"average {record['load_average'][0]:.1f} when it finished. Medians of {options.repeats} alternating "
        f"run(s) of `{record['command']}`.",
        "",
        "| stage | " + " | ".join(f"{name} (s)" for name in names) + f" | speed-up, {many} vs {one} |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    labels = {"wall_s": "whole run (wall)", "finetune_s": "fine-tuning", "features_s": "gradient collection"}
    labels["scoring_s"] = "scoring"
    for key, label in labels.items():
        cells = " | ".join(f"{median[name][key]:.1f}" for name in names)
        lines.append(f"| {label} | {cells} | {median[one][key] / median[many][key]:.2f}x |")
    lines += [
        "",
        f"Largest relative difference of any method's score matrix between the {many} and the "
        f"{names[0]} run: {record['max_relative_score_difference']:.1e} (float32 summation order; the CI "
        "test `tests/pipeline/test_distributed.py` bounds it on the tiny model). Each process loads the "
        "model once, which at this size is much of the wall time.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
