"""Scaling of streamed scoring from 10^3 to 10^5 training examples (part of ``make bench``).

For each size, one child process writes a feature store of synthetic projected gradients and another
scores 100 test examples against it with the study's five methods, streamed (training features read
shard by shard, score files written column block by column block). Each child reports its wall time
and peak RSS (``ru_maxrss`` of its own process, so sizes do not contaminate each other).

The gradients are synthetic: no model runs, because at 10^5 examples model time would dominate and
gradient collection is a batched pass whose cost per example does not depend on n (``bench.py`` times
it against training). Blocks are laid out as the embedded SmolLM2-135M's LoRA (r=4 on q_proj and
v_proj: 30 layers x 4 matrices) and projected to ``--projection-dim`` numbers each; every example's
projected gradient is formed as the collector forms it, ``sum_t (P_out g_t)(P_in x_t)^T`` over 64
tokens, with the projected token factors drawn at random.

Writes a "Scaling" section into ``docs/benchmarks.md`` (replacing an earlier one, keeping the rest).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, overload

import torch
from sections import write_section

SIZES = (1_000, 10_000, 100_000)
N_TEST = 100
TOKENS = 64
CLASSES = 10
HIDDEN = 576
LAYERS = 30
SHAPES = {
    "q_proj.lora_A": (4, 576),
    "q_proj.lora_B": (576, 4),
    "v_proj.lora_A": (4, 576),
    "v_proj.lora_B": (192, 4),
}
METHODS = ("hessian-free", "datainf", "lissa", "exact", "repsim")


class Lazy(Sequence[Any]):
    """``n`` items made on demand from their index (no list of n examples, ids or labels in memory)."""

    def __init__(self, n: int, make: Callable[[int], Any]) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self.make(i) for i in range(self.n)[index]]
        if not -self.n <= index < self.n:
            raise IndexError(index)
        return self.make(index % self.n)


def examples(n: int, split: str) -> Lazy:
    from llm_attribution.data.schema import Example

    return Lazy(n, lambda i: Example(f"{split}-{i:06d}", "", "", f"c{i % CLASSES}"))


def row_of(example_id: str) -> int:
    return int(example_id.rsplit("-", 1)[1])


def synthetic_features(ids: list[str], start: int, dim: int, seed: int) -> Any:
    """Projected per-example gradients of ``TOKENS``-token examples, and representations (seeded by row)."""
    from llm_attribution.features.gradients import Features
    from llm_attribution.features.projection import factor_dims

    generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
    n = len(ids)
    blocks = {}
    for layer in range(LAYERS):
        for matrix, (d_out, d_in) in SHAPES.items():
            k_out, k_in = factor_dims(d_out, d_in, dim)
            grads_out = torch.randn(n, TOKENS, k_out, generator=generator) / TOKENS
            inputs = torch.randn(n, TOKENS, k_in, generator=generator)
            grad = torch.einsum("bto,bti->boi", grads_out, inputs).reshape(n, -1)
            blocks[f"layers.{layer}.self_attn.{matrix}"] = grad
    representations = torch.randn(n, HIDDEN, generator=generator)
    return Features(ids, blocks, representations, torch.rand(n, generator=generator))


def store_for(folder: Path, n: int, dim: int) -> Any:
    from llm_attribution.features.store import FeatureStore

    return FeatureStore(
        folder, "train", {"synthetic": "scaling", "n": n, "projection_dim": dim}, shard_size=256
    )


def child_write(folder: Path, n: int, dim: int) -> dict[str, Any]:
    train = examples(n, "train")
    store = store_for(folder, n, dim)
    start = time.perf_counter()
    store.ensure(train, lambda chunk: synthetic_features([e.id for e in chunk], row_of(chunk[0].id), dim, 0))
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in store.folder.iterdir())
    return {"write_s": seconds, "store_bytes": size}


def child_score(folder: Path, n: int, dim: int) -> dict[str, Any]:
    from llm_attribution.attribution.registry import get_method
    from llm_attribution.scoring.engine import ScoringJob, score_streamed
    from llm_attribution.scoring.store import ScoreStore
    from llm_attribution.scoring.train_features import TrainFeatures

    train = examples(n, "train")
    store = store_for(folder, n, dim)
    test = synthetic_features([f"test-{i:06d}" for i in range(N_TEST)], 0, dim, seed=1)
    test_labels = [f"c{i % CLASSES}" for i in range(N_TEST)]
    methods = {name: get_method(name) for name in METHODS}
    start = time.perf_counter()
    job = ScoringJob(
        methods,
        ScoreStore(folder / "scores"),
        {},
        Lazy(n, lambda i: f"train-{i:06d}"),
        test.ids,
        Lazy(n, lambda i: f"c{i % CLASSES}"),
        test_labels,
    )
    results, _ = score_streamed(job, lambda: (TrainFeatures.from_store(store, train), test))
    seconds = time.perf_counter() - start
    return {
        "score_s": seconds,
        "method_s": {name: r.seconds for name, r in results.items()},
        "accuracy": {name: r.metrics.accuracy for name, r in results.items()},
    }


def child(args: argparse.Namespace) -> None:
    from llm_attribution.core.progress import set_quiet

    set_quiet(True)
    torch.set_num_threads(args.threads)
    run = child_write if args.child == "write" else child_score
    result = run(Path(args.folder), args.n, args.projection_dim)
    # ru_maxrss is in KiB on Linux: this process's own peak, so every size is measured clean
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_child(mode: str, folder: Path, n: int, dim: int, threads: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--n", str(n)]
    command += ["--projection-dim", str(dim), "--threads", str(threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measure(sizes: Sequence[int], dim: int, threads: int, scratch: Path) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        folder = Path(tempfile.mkdtemp(prefix=f"scaling-{n}-", dir=scratch))
        try:
            write = run_child("write", folder, n, dim, threads)
            score = run_child("score", folder, n, dim, threads)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append({"n": n, **score, "write_s": write["write_s"], "store_bytes": write["store_bytes"]})
        print(
            f"n={n}: write {write['write_s']:.1f} s, score {score['score_s']:.1f} s, "
            f"peak RSS scoring {score['peak_rss_mib']:.0f} MiB",
            file=sys.stderr,
        )
    return rows


def machine(threads: int) -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {memory:.0f} GiB RAM, torch {torch.__version__}, "
        f"{threads} torch thread(s) per process, load average {os.getloadavg()[0]:.1f} when it finished "
        "(other jobs share the machine: times are noisy, memory is not)"
    )


def per_example(row: dict[str, Any]) -> float:
    return float(row["score_s"]) / int(row["n"])


def report(rows: list[dict[str, Any]], dim: int, threads: int, command: str) -> str:
    today = datetime.date.today().isoformat()
    first, last = rows[0], rows[-1]
    ratios = ", ".join(
        f"{last['n']:,} / {row['n']:,}: **{per_example(last) / per_example(row):.2f}**" for row in rows[:-1]
    )
    rss_ratio = last["peak_rss_mib"] / first["peak_rss_mib"]
    headers = " | ".join(f"{name} µs" for name in METHODS)
    lines = [
        "## Scaling: streamed scoring from 10^3 to 10^5 training examples",
        "",
        f"Measured by `make bench` (`{command}`) on {today}, on {machine(threads)}.",
        "",
        f"{N_TEST} test examples scored against n_train training examples by the study's five methods, with "
        "default settings, streamed: training features read shard by shard (256 examples) from the feature "
        "store, score files written column block by column block. Synthetic projected gradients, no model: "
        "120 LoRA blocks laid out as the embedded SmolLM2-135M's (r=4 on q/v, 30 layers), each projected "
        f"to {dim} numbers (`--projection-dim {dim}`), every gradient a sum over {TOKENS} tokens of "
        f"projected factors; representations of width {HIDDEN}. Each size runs in fresh processes (one "
        "writes the store, one scores), so peak RSS (`ru_maxrss`) is that size's own.",
        "",
        f"| n_train | store MiB | write store, µs/example | {headers} | all five and metrics, µs/example "
        "| peak RSS scoring, MiB |",
        "|---:|---:|---:|" + "---:|" * len(METHODS) + "---:|---:|",
    ]
    for row in rows:
        n = row["n"]
        methods = " | ".join(f"{1e6 * row['method_s'][name] / n:.1f}" for name in METHODS)
        lines.append(
            f"| {n:,} | {row['store_bytes'] / 2**20:.0f} | {1e6 * row['write_s'] / n:.1f} | {methods} "
            f"| {1e6 * per_example(row):.1f} | {row['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        f"Scoring time per training example, ratio between sizes {ratios} (linear time: about 1; below 1 "
        "where fixed costs, such as LiSSA's 100 steps on d x d matrices, are spread over more examples). "
        f"Peak RSS of scoring at {last['n']:,} / at {first['n']:,}: **{rss_ratio:.2f}** "
        f"(flat memory, goal within 20%: {'met' if abs(rss_ratio - 1) <= 0.2 else 'NOT met'}).",
        "",
        "Per method, µs per training example for all test examples together, including its passes over the "
        "store: hessian-free's include the statistics pass the gradient methods share; lissa and exact "
        "accumulate each block's d x d Fisher in one pass (d = the projected width), so lissa's 100 steps "
        "read no more training data. The score files themselves (n_test x n_train float32) are on disk, "
        "not in memory; metrics are judged from them a few rows at a time.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated n_train values")
    parser.add_argument("--projection-dim", type=int, default=16, help="projected numbers per LoRA block")
    # One thread by default: per-block products are small (d = the projected width), so more threads add
    # synchronisation, which on a shared machine costs more than it saves (measured here: 8x slower with 2).
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child process")
    parser.add_argument(
        "--scratch", default=None, help="folder for the temporary stores (default: system temp)"
    )
    parser.add_argument("--out", default="docs/benchmarks.md", help="Markdown file to put the section into")
    parser.add_argument("--child", choices=("write", "score"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    scratch = Path(args.scratch or tempfile.gettempdir())
    rows = measure(sizes, args.projection_dim, args.threads, scratch)
    command = "python benchmarks/scaling.py" + (
        "" if args.sizes == ",".join(map(str, SIZES)) else f" --sizes {args.sizes}"
    )
    section = report(rows, args.projection_dim, args.threads, command)
    print(section)
    write_section(Path(args.out), "scaling", section)


if __name__ == "__main__":
    main()
