"""SIGKILL `llm-attr run` mid-way, start it again, and check it ends where an uninterrupted run ends.

    python scripts/kill_resume.py                 # the three moments below, on a tiny run (about a minute)
    python scripts/kill_resume.py --random 5      # 5 runs, each killed at random times until it finishes
    python scripts/kill_resume.py --keep DIR      # keep the run folders in DIR to look at

Fixed moments (set by the test-only hook ``LLM_ATTR_PAUSE_AT``, which stops the process at a named point so
the kill lands exactly there; see ``llm_attribution/pause.py``):

- fine-tuning: in epoch 2, after its 3rd optimizer step and before that step's checkpoint,
- gradient collection: the 2nd feature shard computed but not yet stored,
- scoring: two methods stored, the third (exact) summed over 3 of its 8 LoRA blocks, 2 of them stored.

Each killed run is started again with the same command. Then every artefact is compared with the
uninterrupted run's: ``results.json`` (all but timings and the run's own path), every score matrix
(``torch.equal``), every epoch's adapter weights, the loss curve and the feature shards' checksums, all
bit for bit. A file the killed run had finished must not be rewritten by the rerun (proof that it resumed
rather than started over). ``tests/pipeline/test_kill_resume.py`` calls :func:`check_moments`, so the test
and this script cannot disagree. Exit status 0 when everything is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

RUN_ARGS = (
    "--task",
    "grammars",
    "--model",
    "tiny",
    "--train-limit",
    "60",
    "--test-limit",
    "10",
    "--epochs",
    "2",
    "--methods",
    "hessian-free,datainf,exact,repsim",
    "--shard-size",
    "20",
    "--checkpoint-minutes",
    "0",
    "--score-checkpoint-minutes",
    "0",
    "--quiet",
)


@dataclass(frozen=True)
class Moment:
    """Where to kill (a pause point of ``LLM_ATTR_PAUSE_AT``), a file the killed run has finished by then
    (which the rerun must not write again), and a checkpoint it must resume from."""

    stage: str
    pause_at: str
    finished: str  # glob patterns relative to the run folder
    checkpoint: str


MOMENTS = (
    # 60 examples in batches of 8: 8 steps per epoch; step 11 is the 3rd of epoch 2
    Moment("fine-tuning", "finetune-step:11", "adapters/epoch-1/adapter_model.safetensors", "train_state.pt"),
    # train shards of 20 examples: the 2nd is computed, not stored
    Moment(
        "gradient collection",
        "features-shard:2",
        "features/train-*/shard-00000.safetensors",
        "features/train-*/manifest.json",
    ),
    # 8 LoRA blocks per method: 7 block checkpoints each for hessian-free and datainf, then exact's 3rd block
    Moment(
        "scoring", "scores-block:17", "scores/hessian-free.safetensors", "scores/partial-exact.safetensors"
    ),
)
TIMEOUT_S = 300.0
PAUSED = "llm-attr: paused at "


@dataclass
class Outcome:
    """One killed-and-resumed run against the uninterrupted one."""

    name: str
    kills: int
    differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences


def command(out: Path, run_args: Sequence[str] = RUN_ARGS) -> list[str]:
    return [sys.executable, "-m", "llm_attribution", "run", *run_args, "--out", str(out)]


def _env(pause_at: str | None, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LLM_ATTR_PAUSE_AT", None)
    if pause_at:
        env["LLM_ATTR_PAUSE_AT"] = pause_at
    # Same thread count in every run (results are compared bit for bit); one each, as they run side by side.
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_to_end(out: Path, run_args: Sequence[str] = RUN_ARGS, threads: int = 1) -> None:
    """Run the command to completion; raise with its stderr if it fails."""
    done = subprocess.run(
        command(out, run_args),
        env=_env(None, threads),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=TIMEOUT_S,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command(out, run_args))} failed ({done.returncode}): {done.stderr}")


def run_and_kill_at(out: Path, pause_at: str, run_args: Sequence[str] = RUN_ARGS, threads: int = 1) -> None:
    """Start the command, wait until it stops at ``pause_at``, then SIGKILL it."""
    process = subprocess.Popen(
        command(out, run_args),
        env=_env(pause_at, threads),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    seen = []
    watchdog = threading.Timer(TIMEOUT_S, process.kill)  # a run that hangs before the point
    watchdog.start()
    try:
        for line in process.stderr:  # ends when the process exits without reaching the point
            seen.append(line)
            if line.startswith(PAUSED):
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.wait(timeout=TIMEOUT_S)
        watchdog.cancel()
    if process.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run never reached {pause_at} (exit {process.returncode}): {''.join(seen)}")


def run_with_random_kills(
    out: Path, budget_s: float, seed: int, run_args: Sequence[str] = RUN_ARGS, threads: int = 1
) -> int:
    """Start the command again and again, killing each try after a random time, until one finishes.

    Returns the number of kills. Delays are drawn from ``[0, budget_s]``; after 20 kills it runs unkilled.
    """
    rng = random.Random(seed)
    for kills in range(20):
        process = subprocess.Popen(
            command(out, run_args), env=_env(None, threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _, err = process.communicate(timeout=rng.uniform(0.0, budget_s))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            continue
        if process.returncode != 0:
            raise RuntimeError(f"run failed after {kills} kills ({process.returncode}): {err.decode()}")
        return kills
    run_to_end(out, run_args, threads)
    return 20


def _results(run: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((run / "results.json").read_text())
    record.pop("timings")  # seconds: differ between any two runs
    for row in record["methods"].values():
        row.pop("seconds")
    record["adapter"] = Path(record["adapter"]).parts[-2:]  # adapters/epoch-N, without the run's own path
    return record


def compare(reference: Path, candidate: Path) -> list[str]:
    """Every difference between two finished run folders that should be bit-identical (empty: none)."""
    differences = []
    if _results(reference) != _results(candidate):
        differences.append("results.json differs (timings and paths left out)")
    for path in sorted((reference / "scores").glob("*.safetensors")):
        other = candidate / path.relative_to(reference)
        if not other.is_file() or not torch.equal(load_file(path)["scores"], load_file(other)["scores"]):
            differences.append(f"{path.relative_to(reference)} differs")
    for path in sorted((reference / "adapters").glob("epoch-*/adapter_model.safetensors")):
        a, b = load_file(path), load_file(candidate / path.relative_to(reference))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            differences.append(f"{path.relative_to(reference)} differs")
    curves = [json.loads((run / "finetune.json").read_text())["loss"] for run in (reference, candidate)]
    for key in ("step_loss", "epoch_loss"):
        if curves[0][key] != curves[1][key]:
            differences.append(f"finetune.json {key} differs")
    for shard in sorted((reference / "features").glob("*/shard-*.safetensors")):
        other = candidate / shard.relative_to(reference)
        if not other.is_file() or not _same_tensors(shard, other):
            differences.append(f"{shard.relative_to(reference)} differs")
    leftovers = sorted(str(p.relative_to(candidate)) for p in candidate.rglob("*.tmp"))
    if leftovers:
        differences.append(f"half-written files left behind: {', '.join(leftovers[:3])}")
    return differences


def _same_tensors(a: Path, b: Path) -> bool:
    """Same tensors, bit for bit, and same metadata (the files' bytes may differ: safetensors writes its
    metadata in hash-map order, which changes from process to process)."""
    x, y = load_file(a), load_file(b)
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        same_metadata = fa.metadata() == fb.metadata()
    return same_metadata and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _stamp(run: Path, pattern: str) -> tuple[Path, int, int]:
    matches = sorted(run.glob(pattern))
    if not matches:
        raise RuntimeError(f"the killed run had not finished {pattern}")
    stat = matches[0].stat()
    return matches[0], stat.st_ino, stat.st_mtime_ns


def _kill_and_resume(out: Path, moment: Moment, run_args: Sequence[str]) -> Outcome:
    run_and_kill_at(out, moment.pause_at, run_args)
    kept, inode, mtime = _stamp(out, moment.finished)
    _stamp(out, moment.checkpoint)
    run_to_end(out, run_args)
    outcome = Outcome(f"killed during {moment.stage} ({moment.pause_at})", kills=1)
    stat = kept.stat()
    if (stat.st_ino, stat.st_mtime_ns) != (inode, mtime):
        outcome.differences.append(f"{kept.relative_to(out)} was rewritten: the rerun started over")
    return outcome


def check_moments(
    work: Path, moments: Sequence[Moment] = MOMENTS, run_args: Sequence[str] = RUN_ARGS
) -> list[Outcome]:
    """The uninterrupted run and one killed-then-rerun run per moment, side by side; then compare."""
    reference = work / "uninterrupted"
    with ThreadPoolExecutor(max_workers=len(moments) + 1) as pool:
        whole = pool.submit(run_to_end, reference, run_args)
        jobs = [
            pool.submit(_kill_and_resume, work / f"killed-{i}", m, run_args) for i, m in enumerate(moments)
        ]
        whole.result()
        outcomes = [job.result() for job in jobs]
    for i, outcome in enumerate(outcomes):
        outcome.differences += compare(reference, work / f"killed-{i}")
    return outcomes


def check_random(work: Path, trials: int, seed: int, run_args: Sequence[str] = RUN_ARGS) -> list[Outcome]:
    """``trials`` runs killed at random times until they finish, each compared with an uninterrupted run."""
    reference = work / "uninterrupted"
    start = time.perf_counter()
    run_to_end(reference, run_args)
    budget = time.perf_counter() - start
    outcomes = []
    for trial in range(trials):
        out = work / f"random-{trial}"
        kills = run_with_random_kills(out, budget, seed + trial, run_args)
        outcomes.append(Outcome(f"random kills, trial {trial}", kills, compare(reference, out)))
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=0, metavar="N", help="N runs killed at random times")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    parser.add_argument("--keep", metavar="DIR", help="write the run folders here and keep them")
    args = parser.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kill-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        outcomes = check_random(work, args.random, args.seed) if args.random else check_moments(work)
        for outcome in outcomes:
            verdict = "identical" if outcome.identical else "DIFFERENT: " + "; ".join(outcome.differences)
            print(f"{outcome.name}: {outcome.kills} kill(s), resumed, {verdict}")
        seconds = time.perf_counter() - start
        print(f"{sum(o.identical for o in outcomes)} of {len(outcomes)} identical ({seconds:.0f} s)")
        return 0 if all(o.identical for o in outcomes) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
