"""Compare two behaviour snapshots (scripts/behaviour_snapshot.sh): metrics must be identical and score
matrices equal to a relative tolerance. Prints one line per comparison and exits 1 on any difference.

    .venv/bin/python scripts/compare_runs.py BEFORE AFTER [--rtol 1e-6]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

METRIC_KEYS = ("accuracy", "coverage", "k")


def compare_run(before: Path, after: Path, rtol: float) -> list[str]:
    """Differences between two run folders: results.json metrics, then every score file."""
    problems = []
    old = json.loads((before / "results.json").read_text())["methods"]
    new = json.loads((after / "results.json").read_text())["methods"]
    if set(old) != set(new):
        problems.append(f"{after}: methods {sorted(new)} != {sorted(old)}")
    for name in sorted(set(old) & set(new)):
        for key in METRIC_KEYS:
            if old[name][key] != new[name][key]:
                problems.append(f"{after.name}/{name}: {key} {new[name][key]} != {old[name][key]}")
        a = load_file(str(before / "scores" / f"{name}.safetensors"))["scores"].double()
        b = load_file(str(after / "scores" / f"{name}.safetensors"))["scores"].double()
        error = float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))
        status = "ok" if error <= rtol else "DIFFERS"
        print(f"{after.name:<10} {name:<16} max relative difference {error:.2e}  {status}")
        if error > rtol:
            problems.append(f"{after.name}/{name}: scores differ by {error:.2e} relative")
    return problems


def compare_explain(before: Path, after: Path, rtol: float) -> list[str]:
    old = json.loads(before.read_text())["methods"]
    new = json.loads(after.read_text())["methods"]
    problems = []
    for name in sorted(set(old) | set(new)):
        ids_old = [row["id"] for row in old.get(name, [])]
        ids_new = [row["id"] for row in new.get(name, [])]
        scores_old = torch.tensor([row["score"] for row in old.get(name, [])], dtype=torch.float64)
        scores_new = torch.tensor([row["score"] for row in new.get(name, [])], dtype=torch.float64)
        same = ids_old == ids_new and torch.allclose(scores_new, scores_old, rtol=rtol, atol=0.0)
        print(f"explain    {name:<16} {'ok' if same else 'DIFFERS'}")
        if not same:
            problems.append(f"explain/{name}: ranking or scores differ")
    return problems


def compare_study(before: Path, after: Path) -> list[str]:
    old = json.loads((before / "study.json").read_text())["tasks"]
    new = json.loads((after / "study.json").read_text())["tasks"]
    same = old == new
    print(f"study      {'all tasks':<16} {'ok' if same else 'DIFFERS'}")
    return [] if same else ["study.json: judged metrics differ"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-6)
    args = parser.parse_args()
    problems = []
    for name in ("memory", "stream", "bf16", "torchrun", "demo"):
        if (args.before / name / "results.json").is_file():
            problems += compare_run(args.before / name, args.after / name, args.rtol)
    problems += compare_explain(args.before / "explain.json", args.after / "explain.json", args.rtol)
    problems += compare_study(args.before / "study", args.after / "study")
    for problem in problems:
        print(problem, file=sys.stderr)
    print("identical within tolerance" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
