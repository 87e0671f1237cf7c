"""The study's grid judged: per method, per-test metrics averaged over fine-tuning seeds, 95% bootstrap
intervals over test examples, the spread over seeds and per-class means; and the grid as Markdown.
Scores are matrices here (HIGHER = the training example supports the test output more): reading them
from run folders is the study workflow's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .ranking import ranking_metrics
from .statistics import bootstrap_ci, per_class, seed_spread

METRICS = ("accuracy", "coverage", "auc", "average_precision", "reciprocal_rank", "precision_at_10")


@dataclass(frozen=True)
class SeedScores:
    """One method's scores in one fine-tuning seed's run, with that run's labels."""

    scores: torch.Tensor
    train_labels: Sequence[str]
    test_labels: Sequence[str]


def judge_method(seeds: Sequence[SeedScores]) -> dict[str, Any]:
    """Per metric: the mean over test examples of the per-test value averaged over seeds, its interval,
    the seed spread and per-class means."""
    per_seed: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
    for seed in seeds:
        ranking = ranking_metrics(seed.scores, seed.train_labels, seed.test_labels, precision_ks=(10,))
        values = {
            "accuracy": ranking.hit.astype(float),
            "coverage": ranking.coverage,
            "auc": ranking.auc,
            "average_precision": ranking.average_precision,
            "reciprocal_rank": ranking.reciprocal_rank,
            "precision_at_10": ranking.precision_at[10],
        }
        for name in METRICS:
            per_seed[name].append(values[name])
    test_labels = seeds[-1].test_labels if seeds else []
    return {name: _metric_summary(per_seed[name], test_labels) for name in METRICS}


def _metric_summary(per_seed: list[np.ndarray], test_labels: Sequence[str]) -> dict[str, Any]:
    # The test set is the same for every seed, so a test's value is averaged over seeds first and the
    # interval is taken over test examples; the seed spread is reported beside it.
    stacked = np.vstack(per_seed)
    per_test = np.nanmean(stacked, axis=0) if np.isfinite(stacked).any() else stacked[0]
    low, high = bootstrap_ci(per_test)
    return {
        "mean": float(np.nanmean(per_test)) if np.isfinite(per_test).any() else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "seeds": seed_spread(
            [float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for v in per_seed]
        ),
        "per_class": per_class(per_test, list(test_labels)),
    }


def study_markdown(record: dict[str, Any]) -> str:
    """The grid as a Markdown table: mean [95% CI] over test examples, and the seed standard deviation."""
    lines = [
        "| task | method | accuracy [95% CI] | coverage [95% CI] | AUC | AUPRC | MRR | P@10 | seed sd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, methods in record["tasks"].items():
        for method, m in methods.items():
            acc, cov = m["accuracy"], m["coverage"]
            lines.append(
                f"| {task} | {method} | {acc['mean']:.3f} [{acc['ci_low']:.2f}, {acc['ci_high']:.2f}] | "
                f"{cov['mean']:.3f} [{cov['ci_low']:.2f}, {cov['ci_high']:.2f}] | {m['auc']['mean']:.3f} | "
                f"{m['average_precision']['mean']:.3f} | {m['reciprocal_rank']['mean']:.3f} | "
                f"{m['precision_at_10']['mean']:.3f} | {acc['seeds']['std']:.3f}/{cov['seeds']['std']:.3f} "
                f"(n={int(acc['seeds']['n'])}) |"
            )
    return "\n".join(lines)


def per_class_markdown(record: dict[str, Any]) -> str:
    """Per task, one row per test class: each method's accuracy / coverage averaged over that class's tests
    (and seeds). It shows which classes a method fails on, which the grid's means hide."""
    parts = []
    for task, methods in record["tasks"].items():
        names = list(methods)
        classes = sorted({c for m in methods.values() for c in m["accuracy"]["per_class"]})
        parts += [
            f"**{task}** (accuracy / coverage per test class)",
            "",
            "| class | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for label in classes:
            cells = [
                f"{methods[m]['accuracy']['per_class'].get(label, float('nan')):.2f} / "
                f"{methods[m]['coverage']['per_class'].get(label, float('nan')):.2f}"
                for m in names
            ]
            shown = label if len(label) <= 40 else label[:37] + "..."
            parts.append(f"| {shown.replace('|', '/')} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts).rstrip()
