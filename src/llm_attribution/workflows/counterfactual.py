"""``llm-attr counterfactual``: remove each method's top-k training examples, retrain, and see whether the
test behaviour changes; beside it the same number of random examples, and of random examples of the test's
own class.

Protocol (sized for a CPU): the test examples are taken in GROUPS, one group per test label (a class, the
triggered prompts of a backdoor, the harmful requests). For a group, a method ranks the training examples
by their scores summed over the group's test examples; its top k are removed and the run's initial adapter
is fine-tuned again on the rest with the run's settings and seed (:mod:`.retraining`). Measured on the
group: the change of the mean response loss against the full-data model (higher = the removed examples
supported the behaviour), and the share of greedy answers that the behaviour judge reads as the group's
label (the behaviour itself). Cost: groups x k values x (methods + 2 x draws baselines) retrains, each of
about one fine-tune (the random baselines are nested: the k random examples of a draw are the first k of
one permutation). With ``--draws D`` each baseline is drawn D times and the table gives their mean and
spread, so that a method's effect can be read against the variation of random removals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..core import distributed
from ..core.errors import ConfigError, RunError
from ..core.seeds import block_seed
from ..core.settings import option, require, require_positive, to_dict
from ..core.storage import write_json_atomic
from ..core.versions import package_versions
from ..data.schema import Example
from ..diagnostics.behaviour import judge_labels
from ..features.gradients import GradientSettings
from ..features.losses import example_losses
from ..models.generate import generate_answers
from .attribute import AttributeSettings, attribute_run
from .layout import COUNTERFACTUAL_FILE, counterfactual_dir, counterfactual_file, counterfactual_work_dir
from .retraining import RetrainJob, read_result, retrain_all
from .runs import open_run

log = logging.getLogger(__name__)

RANDOM = "random"
SAME_CLASS = "random-same-class"
BASELINES = (RANDOM, SAME_CLASS)
ANSWER_TOKENS = 16


@dataclass(frozen=True)
class CounterfactualSettings:
    """Which test groups, how many examples to remove, and how the baselines are drawn."""

    k: tuple[int, ...] = option(
        (1, 5, 20), "comma-separated numbers of top-ranked training examples to remove"
    )
    labels: tuple[str, ...] = option(
        (), "comma-separated test labels whose groups to test (default: --groups labels drawn with --seed)"
    )
    groups: int = option(2, "test groups (one per test label) when --labels is not given")
    seed: int = option(0, "seed of the group choice and of the random baselines")
    draws: int = option(
        1,
        "independent draws of each random baseline (the table gives their mean and spread)",
        recorded_at_default=False,
    )
    behaviour: bool = option(True, "generate greedy answers after each retrain and judge their behaviour")
    workers: int = option(1, "retrain this many at once, in worker processes", recorded=False)

    def __post_init__(self) -> None:
        require(len(self.k) > 0, "--k must list at least one number")
        for k in self.k:
            require_positive("k", k)
        require(len(set(self.k)) == len(self.k), "--k lists a number twice")
        require_positive("groups", self.groups)
        require_positive("draws", self.draws)
        require_positive("workers", self.workers)


@dataclass(frozen=True)
class Group:
    """The test examples of one label."""

    index: int
    label: str
    tests: tuple[int, ...]  # rows of the run's test set


def choose_groups(test: Sequence[Example], settings: CounterfactualSettings) -> list[Group]:
    """One group per chosen test label, in the order of the labels as given (or drawn)."""
    present = sorted({e.label for e in test})
    if settings.labels:
        unknown = [label for label in settings.labels if label not in present]
        if unknown:
            raise ConfigError(
                f"--labels: no test example has label {', '.join(map(repr, unknown))} "
                f"(the test labels: {', '.join(map(repr, present))})"
            )
        chosen = list(settings.labels)
    else:
        order = torch.randperm(len(present), generator=torch.Generator().manual_seed(settings.seed))
        chosen = [present[i] for i in order[: settings.groups].tolist()]
    return [
        Group(i, label, tuple(row for row, e in enumerate(test) if e.label == label))
        for i, label in enumerate(chosen)
    ]


def removal_order(scores: torch.Tensor, group: Group) -> torch.Tensor:
    """Training rows from most to least supportive of the group: scores summed over its test rows (ties in
    training order)."""
    total = scores[list(group.tests)].double().sum(dim=0)
    return torch.argsort(total, descending=True, stable=True)


def baseline_orders(
    train: Sequence[Example], group: Group, seed: int, draw: int = 0
) -> dict[str, torch.Tensor]:
    """A random permutation of all training rows, and one of the rows of the group's class; ``draw``
    indexes independent permutations (draw 0 is the one a single-draw table uses)."""
    everything = torch.randperm(
        len(train), generator=torch.Generator().manual_seed(block_seed(seed, f"{group.label}/random", draw))
    )
    own = torch.tensor([row for row, e in enumerate(train) if e.label == group.label], dtype=torch.int64)
    generator = torch.Generator().manual_seed(block_seed(seed, f"{group.label}/same-class", draw))
    return {RANDOM: everything, SAME_CLASS: own[torch.randperm(len(own), generator=generator)]}


def draw_source(source: str, draw: int) -> str:
    """The name a baseline's result files carry: draw 0 keeps the bare name, so single-draw folders stay
    valid."""
    return source if draw == 0 else f"{source}-draw{draw}"


def run_counterfactual(
    run: Path,
    settings: CounterfactualSettings,
    attribute: AttributeSettings,
    gradients: GradientSettings,
) -> dict[str, Any]:
    """Score the run's methods (reusing stored scores), retrain without each top-k, write the table."""
    if attribute.epoch is not None:
        raise ConfigError("counterfactual compares with fully retrained models: it attributes the last epoch")
    loaded_run = open_run(run)
    if loaded_run.epoch is None:
        raise RunError(
            f"{run} explains an adapter trained elsewhere: retraining needs a run this tool trained"
        )
    config, task = loaded_run.config, loaded_run.task
    n_train = len(task.train)
    too_many = [k for k in settings.k if k >= n_train]
    if too_many:
        raise ConfigError(f"--k {too_many[0]} removes all {n_train} training examples or more")
    groups = choose_groups(task.test, settings)
    record = attribute_run(loaded_run, attribute, config.prompt, gradients, config.model)
    scores = {
        name: load_file(run / record["methods"][name]["scores"])["scores"] for name in attribute.methods
    }
    full = example_losses(loaded_run.model, loaded_run.tokenizer, task.test, config.prompt)
    rows = sorted({row for group in groups for row in group.tests})
    full_answers: dict[int, str] = {}
    if settings.behaviour:
        prompts = [task.test[i].prompt for i in rows]
        generated = generate_answers(
            loaded_run.model, loaded_run.tokenizer, prompts, config.prompt, ANSWER_TOKENS
        )
        full_answers = dict(zip(rows, generated, strict=True))
    plans: dict[tuple[int, str, int], torch.Tensor] = {}  # (group, source, k) -> removed training rows
    draws: dict[str, tuple[str, int]] = {}  # file source -> (baseline, draw)
    for group in groups:
        orders = {name: removal_order(matrix, group) for name, matrix in scores.items()}
        for draw in range(settings.draws):
            for baseline, order in baseline_orders(task.train, group, settings.seed, draw).items():
                orders[draw_source(baseline, draw)] = order
                draws[draw_source(baseline, draw)] = (baseline, draw)
        for source, order in orders.items():
            for k in settings.k:
                drawn = draws.get(source, (source, 0))
                if drawn[0] == SAME_CLASS and (k > len(order) or (k == len(order) and drawn[1] > 0)):
                    continue  # more than the class has: no such baseline; all of it: one draw is enough
                plans[(group.index, source, k)] = order[:k]
    jobs = {
        key: RetrainJob(
            seed=config.train.seed,
            rows=tuple(sorted(set(range(n_train)) - set(removed.tolist()))),
            out=counterfactual_file(run, *key),
            work=counterfactual_work_dir(run, *key),
            answer_rows=groups[key[0]].tests if settings.behaviour else (),
            answer_tokens=ANSWER_TOKENS,
        )
        for key, removed in plans.items()
    }
    start = time.perf_counter()
    retrain_all(run, list(jobs.values()), settings.workers, desc="counterfactual retraining")
    wall = time.perf_counter() - start
    table = []
    for key, job in jobs.items():
        result = read_result(job.out)
        if tuple(result.rows.tolist()) != job.rows:
            raise RunError(f"{job.out} was retrained on other examples; delete it and run again")
        group = groups[key[0]]
        tests = list(group.tests)
        source, draw = draws.get(key[1], (key[1], -1))  # -1: a method, not a drawn baseline
        entry: dict[str, Any] = {
            "group": group.label,
            "source": source,
            "k": key[2],
            "removed_ids": [task.train[i].id for i in plans[key].tolist()],
            "removed_share_of_class": float(
                np.mean([task.train[i].label == group.label for i in plans[key].tolist()])
            ),
            "response_loss_change": _mean_change(result.response, full.response, tests),
            "attributed_loss_change": _mean_change(result.attributed, full.attributed, tests),
            "seconds": result.seconds,
        }
        if settings.behaviour:
            entry["behaviour_rate"] = _behaviour_rate(
                [result.answers[i] for i in tests], task.train, group.label
            )
        if draw >= 0:
            entry["draw"] = draw
        table.append(entry)
    out: dict[str, Any] = {
        "what": (
            "per test group (one test label): remove the k training examples a method ranks most supportive "
            "of the group (scores summed over its tests), retrain, and measure the group's mean loss change "
            "against the full-data model (higher = the removal hurt the behaviour more) and the share of its "
            "greedy answers the behaviour judge reads as the group's label"
        ),
        "task": task.name,
        "n_train": n_train,
        "settings": to_dict(settings),
        "methods": list(attribute.methods),
        "baselines": list(BASELINES),
        "groups": [
            {
                "label": g.label,
                "n_test": len(g.tests),
                "n_train_of_class": sum(e.label == g.label for e in task.train),
                "full_response_loss": float(full.response[list(g.tests)].nanmean()),
                "full_behaviour_rate": (
                    _behaviour_rate([full_answers[i] for i in g.tests], task.train, g.label)
                    if settings.behaviour
                    else None
                ),
            }
            for g in groups
        ],
        "results": table,
        "baseline_draws": summarise_draws(table),
        "cost": {
            "retrains": len(jobs),
            "seconds_per_retrain": float(np.mean([entry["seconds"] for entry in table])),
            "wall_seconds_this_call": wall,
        },
        "versions": package_versions(),
    }
    distributed.on_main(write_json_atomic, counterfactual_dir(run) / COUNTERFACTUAL_FILE, out)
    return out


def summarise_draws(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group, baseline and k: the mean, standard deviation and range of the draws' changes."""
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for entry in table:
        if "draw" in entry:
            cells.setdefault((entry["group"], entry["source"], entry["k"]), []).append(entry)
    summary = []
    for (group, source, k), entries in cells.items():
        row: dict[str, Any] = {"group": group, "source": source, "k": k, "draws": len(entries)}
        for measure in ("response_loss_change", "attributed_loss_change", "behaviour_rate"):
            values = np.array([e[measure] for e in entries if measure in e], dtype=float)
            if len(values) == 0:
                continue
            row[measure] = {
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
                "min": float(values.min()),
                "max": float(values.max()),
            }
        summary.append(row)
    return summary


def _behaviour_rate(answers: list[str], train: Sequence[Example], label: str) -> float:
    """The share of ``answers`` the behaviour judge reads as ``label``'s behaviour."""
    return float(np.mean([judged == label for judged in judge_labels(answers, train)]))


def _mean_change(after: torch.Tensor, before: torch.Tensor, rows: list[int]) -> float:
    return float((after[rows] - before[rows]).nanmean())


def counterfactual_lines(record: dict[str, Any]) -> list[str]:
    """Per group, one row per k: each source's response-loss change (and behaviour rate)."""
    sources = [*record["methods"], *record["baselines"]]
    lines = [f"remove and retrain on {record['task']} ({record['n_train']} training examples)"]
    for group in record["groups"]:
        behaviour = group["full_behaviour_rate"]
        shown = "" if behaviour is None else f", behaviour rate {behaviour:.2f}"
        lines.append(
            f"group {group['label']!r}: {group['n_test']} tests, {group['n_train_of_class']} training "
            f"examples of its class; full data: response loss {group['full_response_loss']:.3f}{shown}"
        )
        lines.append("    k  " + "  ".join(f"{s:>18}" for s in sources))
        found = group_cells(record, group["label"])
        for k in record["settings"]["k"]:
            cells = []
            for source in sources:
                entry = found.get((source, k))
                if entry is None:
                    cells.append(f"{'-':>18}")
                    continue
                rate = entry.get("behaviour_rate")
                cells.append(
                    f"{entry['response_loss_change']:+.3f}" + ("" if rate is None else f" ({rate:.2f})")
                )
                cells[-1] = cells[-1].rjust(18)
            lines.append(f"{k:>5}  " + "  ".join(cells))
    lines.append("cells: mean response-loss change after removal (behaviour rate after removal)")
    spread = [row for row in record.get("baseline_draws", []) if row["draws"] > 1]
    if spread:
        lines.append(
            "baselines: the mean over their draws; the draws' spread (sd, range of the loss change):"
        )
        for row in spread:
            change = row["response_loss_change"]
            lines.append(
                f"    {row['group']!r} {row['source']} k={row['k']}: {row['draws']} draws, sd "
                f"{change['sd']:.3f}, range [{change['min']:+.3f}, {change['max']:+.3f}]"
            )
    return lines


def group_cells(record: dict[str, Any], label: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(source, k) -> the cell shown for one group: a method's entry, or a baseline's mean over draws."""
    found = {(e["source"], e["k"]): e for e in record["results"] if e["group"] == label and "draw" not in e}
    for row in record.get("baseline_draws", []):
        if row["group"] == label:
            found[(row["source"], row["k"])] = {
                measure: row[measure]["mean"]
                for measure in ("response_loss_change", "attributed_loss_change", "behaviour_rate")
                if measure in row
            } | {"draws": row["draws"]}
    return found
