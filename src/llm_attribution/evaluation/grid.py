"""The study's grid judged: per method, per-test metrics averaged over fine-tuning seeds, 95% intervals
that carry both the seeds' and the test examples' noise (a crossed bootstrap; accuracy's also no narrower
than its Wilson interval), coverage beside its cap, the spread over seeds and per-class means; paired
differences between methods; and the grid as Markdown. Scores are matrices here (HIGHER = the training
example supports the test output more): reading them from run folders is the study workflow's job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .metrics import coverage_caps
from .ranking import ranking_metrics
from .statistics import interval, paired_difference, per_class, seed_spread, wilson_interval

METRICS = (
    "accuracy",
    "coverage",
    "coverage_normalised",
    "auc",
    "average_precision",
    "reciprocal_rank",
    "precision_at_10",
)
PAIRED_METRICS = ("accuracy", "coverage")


@dataclass(frozen=True)
class SeedScores:
    """One method's scores in one fine-tuning seed's run, with that run's labels."""

    scores: torch.Tensor
    train_labels: Sequence[str]
    test_labels: Sequence[str]


@dataclass(frozen=True)
class CellMetrics:
    """One method's per-test metrics in one fine-tuning seed's run: everything the grid's judgement needs
    of that cell, small enough to keep where the score matrices are not (a grid run over several
    sessions or machines keeps these and judges them together)."""

    values: Mapping[str, np.ndarray]  # metric of METRICS -> one value per test example (NaN: undefined)
    test_labels: tuple[str, ...]
    coverage_k: int
    coverage_cap: float  # the mean over test examples of the highest coverage any ranking can reach

    def to_dict(self) -> dict[str, Any]:
        # JSON keeps float64 exactly, so a cell judged from this record equals one judged from its scores
        return {
            "values": {
                name: [None if np.isnan(x) else float(x) for x in self.values[name]] for name in METRICS
            },
            "test_labels": list(self.test_labels),
            "coverage_k": self.coverage_k,
            "coverage_cap": self.coverage_cap,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellMetrics:
        return cls(
            values={
                name: np.asarray([np.nan if x is None else x for x in data["values"][name]], dtype=np.float64)
                for name in METRICS
            },
            test_labels=tuple(data["test_labels"]),
            coverage_k=int(data["coverage_k"]),
            coverage_cap=float(data["coverage_cap"]),
        )


def cell_metrics(seed: SeedScores) -> CellMetrics:
    """Every metric of :data:`METRICS` per test example, for one method's scores in one seed's run."""
    ranking = ranking_metrics(seed.scores, seed.train_labels, seed.test_labels, precision_ks=(10,))
    caps = coverage_caps(seed.train_labels, seed.test_labels, ranking.k)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(caps > 0, ranking.coverage / caps, np.nan)
    values = {
        "accuracy": ranking.hit.astype(float),
        "coverage": ranking.coverage,
        "coverage_normalised": normalised,
        "auc": ranking.auc,
        "average_precision": ranking.average_precision,
        "reciprocal_rank": ranking.reciprocal_rank,
        "precision_at_10": ranking.precision_at[10],
    }
    return CellMetrics(
        {name: np.asarray(values[name], dtype=np.float64) for name in METRICS},
        tuple(seed.test_labels),
        int(ranking.k),
        float(caps.mean()),
    )


def judge_method(seeds: Sequence[SeedScores]) -> dict[str, Any]:
    """Per metric: the mean over test examples of the per-test value averaged over seeds, its interval,
    the seed spread and per-class means."""
    return judge_cells([cell_metrics(seed) for seed in seeds])


def judge_cells(cells: Sequence[CellMetrics]) -> dict[str, Any]:
    """:func:`judge_method` from each seed's per-test metrics instead of its scores."""
    per_seed = {name: [cell.values[name] for cell in cells] for name in METRICS}
    test_labels = cells[-1].test_labels if cells else ()
    judged = {name: _metric_summary(per_seed[name], test_labels) for name in METRICS}
    if cells:
        judged["coverage"]["k"] = cells[-1].coverage_k
        judged["coverage"]["cap"] = cells[-1].coverage_cap  # every seed has the same split
        _widen_to_wilson(judged["accuracy"])
    return judged


def _metric_summary(per_seed: list[np.ndarray], test_labels: Sequence[str]) -> dict[str, Any]:
    # The test set is the same for every seed, so the values form a [seeds, tests] matrix: a test's value
    # is averaged over seeds for the mean and the per-class means, and the interval resamples seeds and
    # tests (statistics.interval), so seed variance is in it. The matrix is kept so that every summary
    # can be recomputed from the record.
    stacked = np.vstack(per_seed)
    per_test = np.nanmean(stacked, axis=0) if np.isfinite(stacked).any() else stacked[0]
    low, high = interval(stacked)
    return {
        "mean": float(np.nanmean(per_test)) if np.isfinite(per_test).any() else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "interval": f"crossed bootstrap over {stacked.shape[0]} seed(s) and {stacked.shape[1]} tests",
        "seeds": seed_spread(
            [float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for v in per_seed]
        ),
        "per_class": per_class(per_test, list(test_labels)),
        "per_seed_test": [[None if np.isnan(x) else float(x) for x in row] for row in stacked],
    }


def run_intervals(judged: dict[str, Any]) -> dict[str, Any]:
    """The part of one method's judgement a run's ``results.json`` keeps: accuracy's and coverage's 95%
    intervals (over test examples: a run has one seed), coverage's cap and the share of it reached."""
    accuracy, coverage = judged["accuracy"], judged["coverage"]
    return {
        "accuracy": [accuracy["ci_low"], accuracy["ci_high"]],
        "accuracy_wilson": accuracy["wilson"],
        "coverage": [coverage["ci_low"], coverage["ci_high"]],
        "coverage_k": coverage["k"],
        "coverage_cap": coverage["cap"],
        "coverage_normalised": judged["coverage_normalised"]["mean"],
        "how": accuracy["interval"],
    }


def _widen_to_wilson(accuracy: dict[str, Any]) -> None:
    """Accuracy's interval no narrower than its Wilson interval over the test examples: a bootstrap of
    hits collapses to zero width at 0 and 1 (20 of 20), a binomial interval does not."""
    per_test = np.nanmean(np.asarray(accuracy["per_seed_test"], dtype=np.float64), axis=0)
    low, high = wilson_interval(float(per_test.sum()), per_test.size)
    accuracy["wilson"] = [low, high]
    accuracy["ci_low"], accuracy["ci_high"] = min(accuracy["ci_low"], low), max(accuracy["ci_high"], high)
    accuracy["interval"] += ", widened to the Wilson interval"


def paired_differences(judged: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ordered pair of methods (A listed before B), per metric of :data:`PAIRED_METRICS`: the mean
    of A minus B with its 95% interval from resampling the same seeds and tests for both."""
    names = list(judged)
    pairs = []
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            for metric in PAIRED_METRICS:
                a = np.asarray(judged[first][metric]["per_seed_test"], dtype=np.float64)
                b = np.asarray(judged[second][metric]["per_seed_test"], dtype=np.float64)
                found = paired_difference(a, b)
                pairs.append(
                    {
                        "a": first,
                        "b": second,
                        "metric": metric,
                        "mean": found.mean,
                        "ci_low": found.low,
                        "ci_high": found.high,
                        "resolved": found.resolved,
                    }
                )
    return pairs


def label_blind(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The judged methods that do not read the class labels: a proxy metric counts the labels, so a method
    that reads them (knn-shapley) leads it by construction."""
    return [m for m in methods if not (methods[m].get("notes") or {}).get("uses_labels")]


def best_label_blind(methods: Mapping[str, Mapping[str, Any]], metric: str) -> str:
    """The method of :func:`label_blind` with the highest mean ``metric``; only when every method reads the
    labels is the best chosen among all."""
    return max(label_blind(methods) or methods, key=lambda m: methods[m][metric]["mean"])


def paired_markdown(record: dict[str, Any], metric: str = "coverage") -> str:
    """Per task, the label-blind method with the highest mean ``metric`` (``best_label_blind``) against each
    other method: the paired difference [95% interval], and whether the interval excludes 0."""
    lines = [
        f"| task | best by {metric} | minus | difference [95% CI] | resolved |",
        "|---|---|---|---|---|",
    ]
    for task, pairs in record.get("paired", {}).items():
        best = best_label_blind(record["tasks"][task], metric)
        for pair in pairs:
            if pair["metric"] != metric or best not in (pair["a"], pair["b"]):
                continue
            sign, other = (1.0, pair["b"]) if pair["a"] == best else (-1.0, pair["a"])
            low, high = sorted((sign * pair["ci_low"], sign * pair["ci_high"]))
            lines.append(
                f"| {task} | {best} | {other} | {sign * pair['mean']:+.3f} [{low:+.3f}, {high:+.3f}] | "
                f"{'yes' if pair['resolved'] else 'no'} |"
            )
    return "\n".join(lines)


def noted_name(name: str, notes: Mapping[str, Any] | None) -> str:
    """A method's name as tables show it: with what its notes say it is (``lissa (depth 100, not
    converged on 120 of 120 blocks)``), so that a row never claims more than was computed."""
    if notes and notes.get("uses_labels"):  # knn-shapley: its proxy metrics count what it reads
        return f"{name} (uses class labels)"
    if notes and "iterations" in notes:  # an iterative solver (astra): its iteration cap and convergence
        if notes.get("converged", True):
            return f"{name} ({notes['iterations']} iterations, converged)"
        return (
            f"{name} ({notes['iterations']} iterations, not converged on {notes['blocks_not_converged']} of "
            f"{notes['blocks']} blocks)"
        )
    if notes and "steps" in notes:  # magic: exact metagradients through the replayed steps
        return f"{name} (through {notes['steps']} replayed steps)"
    if not notes or "depth" not in notes:
        return name
    if notes.get("converged", True):
        return f"{name} (depth {notes['depth']}, converged)"
    return (
        f"{name} (depth {notes['depth']}, not converged on {notes['blocks_not_converged']} of "
        f"{notes['blocks']} blocks)"
    )


def study_markdown(record: dict[str, Any]) -> str:
    """The grid as a Markdown table: mean [95% CI over seeds and test examples], coverage's cap and the
    coverage it reaches of its cap, the seed standard deviation, and the mean seconds a method's scoring
    took per cell (features excluded: the methods share them)."""
    lines = [
        "| task | method | accuracy [95% CI] | coverage [95% CI] | coverage cap | coverage / cap | AUC | "
        "AUPRC | MRR | P@10 | seed sd | s per cell |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, methods in record["tasks"].items():
        for method, m in methods.items():
            acc, cov = m["accuracy"], m["coverage"]
            normalised = m.get("coverage_normalised")  # absent from records made before it existed
            cap = f"{cov['cap']:.3f}" if "cap" in cov else "-"
            shown = "-" if normalised is None else f"{normalised['mean']:.3f}"
            lines.append(
                f"| {task} | {noted_name(method, m.get('notes'))} | "
                f"{acc['mean']:.3f} [{acc['ci_low']:.2f}, {acc['ci_high']:.2f}] | "
                f"{cov['mean']:.3f} [{cov['ci_low']:.2f}, {cov['ci_high']:.2f}] | {cap} | {shown} | "
                f"{m['auc']['mean']:.3f} | "
                f"{m['average_precision']['mean']:.3f} | {m['reciprocal_rank']['mean']:.3f} | "
                f"{m['precision_at_10']['mean']:.3f} | {acc['seeds']['std']:.3f}/{cov['seeds']['std']:.3f} "
                f"(n={int(acc['seeds']['n'])}) | {_seconds(m)} |"
            )
    return "\n".join(lines)


def _seconds(judged: Mapping[str, Any]) -> str:
    seconds = judged.get("seconds")  # absent from records made before it existed
    return "-" if seconds is None else f"{seconds['mean']:.1f}"


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
