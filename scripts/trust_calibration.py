"""Fit the trust verdict on ground-truth runs and print its calibration table.

    python scripts/trust_calibration.py --runs runs/gt --lds docs/results/ground-truth \
        --tasks grammars,backdoor,mixedS --write src/llm_attribution/evaluation/trust_calibration.json

For each task: the run's stored scores (RUNS/TASK/scores) and the per-test LDS of each method (from
LDS/TASK.lds.json, the record `llm-attr lds` wrote). The table is held out: for each task the model is
fitted on the OTHER tasks and its verdicts on this task are set against this task's measured LDS (mean
per verdict, 95% interval resampling test examples with all their methods; and high minus low, paired on
the same resamples), then each signal's Pearson correlation with the per-test LDS over a task's (method,
test) pairs. The shipped model (--write) is fitted on every task.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from llm_attribution.evaluation.trust import VERDICTS, TrustSignals, fit_trust_model, trust_signals
from llm_attribution.scoring.store import ScoreStore

# lissa-study ranks exactly as hessian-free (its scores are Hessian-free's times depth + 1), so it would
# count one method's ranking twice in the agreement; the controls are not methods.
LEFT_OUT = {"lissa-study", "constant", "random", "label-oracle"}


def task_samples(runs: Path, lds_root: Path, task: str) -> list[tuple[str, TrustSignals, np.ndarray]]:
    lds = json.loads((lds_root / f"{task}.lds.json").read_text())
    measured = lds["losses"]["attributed"]["methods"]
    methods = [name for name in lds["methods"] if name not in LEFT_OUT]
    store = ScoreStore(runs / task / "scores")
    signals = trust_signals({name: store.read(name) for name in methods})
    return [(f"{task}/{name}", signals[name], np.asarray(measured[name]["per_test"])) for name in methods]


def held_out_rows(
    task: str, samples: list[tuple[str, TrustSignals, np.ndarray]], others: list, n_boot: int = 2000
) -> list[str]:
    model = fit_trust_model(others)
    verdicts = np.array([model.verdicts(signals) for _, signals, _ in samples])  # [methods, tests]
    lds = np.stack([values for _, _, values in samples])
    n_tests = lds.shape[1]
    rng = np.random.default_rng(0)
    counts = np.stack(
        [np.bincount(rng.integers(0, n_tests, n_tests), minlength=n_tests) for _ in range(n_boot)]
    )
    means = {}
    rows = []
    for verdict in VERDICTS:
        mask = (verdicts == verdict).astype(float)  # [methods, tests]
        n = int(mask.sum())
        if n == 0:
            rows.append(f"| {task} | {verdict} | 0 | - |")
            continue
        weight = counts @ (mask * lds).sum(axis=0)  # [n_boot]: resampled sums over the verdict's pairs
        total = counts @ mask.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[verdict] = weight / total
        low, high = np.nanquantile(means[verdict], [0.025, 0.975])
        mean = float((mask * lds).sum() / n)
        rows.append(f"| {task} | {verdict} | {n} | {mean:.2f} [{low:.2f}, {high:.2f}] |")
    if "high" in means and "low" in means:
        difference = means["high"] - means["low"]
        point = float(lds[verdicts == "high"].mean() - lds[verdicts == "low"].mean())
        low, high = np.nanquantile(difference, [0.025, 0.975])
        rows.append(f"| {task} | high - low | | {point:+.2f} [{low:+.2f}, {high:+.2f}] |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=Path, required=True, help="folder of the ground-truth runs, one per task"
    )
    parser.add_argument("--lds", type=Path, required=True, help="folder of TASK.lds.json records")
    parser.add_argument("--tasks", default="grammars,backdoor,mixedS")
    parser.add_argument("--write", type=Path, help="write the model fitted on every task here")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    samples = {task: task_samples(args.runs, args.lds, task) for task in tasks}
    print("| held-out task | verdict | (method, test) pairs | measured LDS [95% CI] |")
    print("|---|---|---|---|")
    for task in tasks:
        others = [sample for other in tasks if other != task for sample in samples[other]]
        print("\n".join(held_out_rows(task, samples[task], others)))
    print()
    print("| task | corr(agreement, LDS) | corr(margin, LDS) |")
    print("|---|---|---|")
    for task in tasks:
        agreement = np.concatenate([signals.agreement for _, signals, _ in samples[task]])
        margin = np.concatenate([signals.margin for _, signals, _ in samples[task]])
        lds = np.concatenate([values for _, _, values in samples[task]])
        print(f"| {task} | {np.corrcoef(agreement, lds)[0, 1]:.2f} | {np.corrcoef(margin, lds)[0, 1]:.2f} |")
    model = fit_trust_model([sample for task in tasks for sample in samples[task]])
    print()
    print(f"fitted on every task: {json.dumps(model.to_dict())}")
    if args.write:
        record = {
            "what": "predicted per-test LDS from top-k agreement and score margin, cut at its terciles",
            "command": "python scripts/trust_calibration.py "
            + " ".join(
                f"--{key} {value}"
                for key, value in vars(args).items()
                if key != "write" and value is not None
            ),
            "machine": f"{platform.machine()}, {platform.system()}",
            "methods": sorted({name.split("/", 1)[1] for name in model.fitted_on}),
            "model": model.to_dict(),
        }
        args.write.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
