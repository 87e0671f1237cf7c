"""What ground truth costs: one LDS subset against one plain fine-tune of the same examples, and the
speed-up of retraining in worker processes.

    python benchmarks/retraining.py                      # embedded model, built-in grammars (minutes)
    python benchmarks/retraining.py --model tiny         # seconds, to try it

The floor is ``models.finetune.finetune`` on a freshly attached adapter, on the examples of LDS subset 0:
what retraining on that subset must cost at least. One LDS subset is the same retrain through
``workflows.retraining`` (the initial adapter and random state restored, the test losses measured and the
result file written), timed by the job itself; the one-off set-up of a command (loading the model and data)
is reported apart. The worker speed-up is the wall time of the same retrains with ``--workers 1`` and
``--workers 2``, set-up included, each in a fresh folder. Same machine, same run, same subsets: like for
like. The section goes into docs/benchmarks.md between its markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llm_attribution.core.progress import set_quiet
from llm_attribution.evaluation.lds import subset_masks
from llm_attribution.models.finetune import Checkpoints, finetune
from llm_attribution.models.lora import attach_lora
from llm_attribution.models.resolve import load_model
from llm_attribution.workflows.layout import lds_subset_file, lds_work_dir
from llm_attribution.workflows.retraining import RetrainJob, read_result, retrain_all
from llm_attribution.workflows.runs import open_run

sys.path.insert(0, str(Path(__file__).parent))
from sections import command_line, write_section


def _make_run(folder: Path, args: argparse.Namespace) -> None:
    command = [sys.executable, "-m", "llm_attribution.cli.main", "finetune", "--task", args.task]
    command += ["--model", args.model, "--train-limit", str(args.train), "--test-limit", str(args.test)]
    command += ["--epochs", str(args.epochs), "--max-length", "48", "--learning-rate", "1e-3", "--quiet"]
    subprocess.run([*command, "--out", str(folder)], check=True)


def _jobs(run: Path, n_train: int, count: int, seed: int) -> list[RetrainJob]:
    masks = subset_masks(n_train, 0.5, 0, range(count))
    return [
        RetrainJob(
            seed=seed,
            rows=tuple(torch.nonzero(masks[i]).flatten().tolist()),
            out=lds_subset_file(run, seed, i),
            work=lds_work_dir(run, seed, i),
        )
        for i in range(count)
    ]


def measure(args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    run = scratch / "run"
    _make_run(run, args)
    loaded_run = open_run(run)
    config, task = loaded_run.config, loaded_run.task
    jobs = _jobs(run, len(task.train), args.subsets, config.train.seed)
    subset = [task.train[i] for i in jobs[0].rows]
    floor = []
    for repeat in range(args.repeats):  # the floor: plain fine-tuning of subset 0's examples
        base = load_model(config.model)
        torch.manual_seed(config.train.seed)
        model = attach_lora(base.model, config.lora)
        where = scratch / f"floor-{repeat}"
        start = time.perf_counter()
        finetune(
            model,
            base.tokenizer,
            subset,
            config.prompt,
            config.train,
            Checkpoints(
                adapter=lambda epoch, where=where: where / f"epoch-{epoch}", state=where / "state.pt"
            ),
        )
        floor.append(time.perf_counter() - start)
    walls = {}
    per_subset: list[float] = []
    for workers in (1, 2):
        copy = scratch / f"workers-{workers}"
        shutil.copytree(run, copy)
        start = time.perf_counter()
        retrain_all(copy, _jobs(copy, len(task.train), args.subsets, config.train.seed), workers)
        walls[workers] = time.perf_counter() - start
        if workers == 1:
            per_subset = [
                read_result(lds_subset_file(copy, config.train.seed, i)).seconds for i in range(args.subsets)
            ]
    floor_s = statistics.median(floor)
    subset_s = statistics.median(per_subset)
    return {
        "floor": floor_s,
        "subset": subset_s,
        "ratio": subset_s / floor_s,
        "setup": walls[1] - sum(per_subset),
        "wall_1": walls[1],
        "wall_2": walls[2],
        "speedup": walls[1] / walls[2],
    }


def report(found: dict[str, float], args: argparse.Namespace, command: str) -> str:
    cores = os.cpu_count()
    return "\n".join(
        [
            "## Ground truth: the cost of one LDS subset, and of worker processes",
            "",
            f"Machine: {platform.machine()}, {cores} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads. Run: {args.model} model, task {args.task}, "
            f"{args.train} training / {args.test} test examples, max length 48, {args.epochs} epoch(s); "
            f"{args.subsets} half-subsets. Command: `{command}`.",
            "",
            "| what | seconds |",
            "|---|---|",
            f"| plain fine-tune of subset 0's examples (the floor; median of {args.repeats}) | "
            f"{found['floor']:.2f} |",
            f"| one LDS subset: retrain + test losses + result file (median over subsets) | "
            f"{found['subset']:.2f} |",
            f"| one LDS subset / the floor (goal: at most 1.1) | {found['ratio']:.2f}x |",
            f"| one-off set-up of a command (model and data loaded once) | {found['setup']:.2f} |",
            f"| {args.subsets} subsets, --workers 1 (wall, set-up included) | {found['wall_1']:.2f} |",
            f"| {args.subsets} subsets, --workers 2 (wall, set-up included) | {found['wall_2']:.2f} |",
            f"| speed-up of --workers 2 | {found['speedup']:.2f}x |",
            "",
            f"`--workers 2` gives each process half of this process's {torch.get_num_threads()} torch "
            "threads, so where one fine-tune already keeps every core busy it can save little beyond "
            "overlapping the set-ups; it is meant for machines with more cores (or GPUs) than one "
            "fine-tune uses.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--task", default="grammars")
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--subsets", type=int, default=16, help="retrains timed per --workers setting")
    parser.add_argument("--repeats", type=int, default=2, help="plain fine-tunes timed for the floor")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    set_quiet(True)
    command = command_line("retraining.py", parser, args)
    with tempfile.TemporaryDirectory() as scratch:
        found = measure(args, Path(scratch))
    section = report(found, args, command)
    print(section)
    write_section(Path(args.out), "retraining", section)


if __name__ == "__main__":
    main()
