"""LDS over several fine-tuning seeds: one run per seed of the same task and test set, each with its own
``llm-attr lds`` (its retrains use its own seed), combined so that the interval carries the seed variance
as well as the test examples' (seeds and tests resampled independently, as the study grid's intervals do).

    python scripts/lds_over_seeds.py RUN_SEED0/lds/lds.json RUN_SEED1/lds/lds.json ... [--base hessian-free]

Prints per method its LDS per seed, the mean over seeds and test examples with the crossed interval, and
the paired difference with ``--base`` (the same seeds and test examples resampled for both).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from llm_attribution.evaluation.statistics import interval, paired_difference


def per_seed_test(records: list[dict[str, Any]], name: str) -> np.ndarray:
    """``[seeds, tests]`` per-test LDS of the attributed loss (a method or a control)."""
    return np.array([r["losses"]["attributed"]["methods"][name]["per_test"] for r in records], dtype=float)


def table(records: list[dict[str, Any]], base: str) -> str:
    if len({(r["task"], r["n_test"]) for r in records}) != 1:
        raise SystemExit("the records must be of one task and one test set")
    seeds = [r["seeds"][0] for r in records]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"each record must be of another fine-tuning seed, got seeds {seeds}")
    names = [*records[0]["methods"], *records[0]["controls"]]
    lines = [
        f"| method | {' | '.join(f'seed {s}' for s in seeds)} | over seeds and tests [95% CI] "
        f"| minus {base} [95% CI] |",
        "|---" * (len(seeds) + 3) + "|",
    ]
    reference = per_seed_test(records, base)
    for name in names:
        values = per_seed_test(records, name)
        low, high = interval(values)
        per_seed = " | ".join(f"{np.nanmean(row):.3f}" for row in values)
        paired = "-"
        if name != base:
            d = paired_difference(values, reference)
            paired = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        lines.append(f"| {name} | {per_seed} | {np.nanmean(values):.3f} [{low:.3f}, {high:.3f}] | {paired} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", type=Path, help="lds.json of each seed's run")
    parser.add_argument("--base", default="hessian-free", help="the method paired differences are taken with")
    args = parser.parse_args()
    print(table([json.loads(p.read_text()) for p in args.records], args.base))


if __name__ == "__main__":
    main()
