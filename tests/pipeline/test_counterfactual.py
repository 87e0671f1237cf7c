"""`llm-attr counterfactual`: which examples each source removes, that removing a whole class removes its
behaviour while removing as many random examples does not (the embedded model, where behaviour is real),
and that a rerun reuses every finished retrain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_attribution.cli.main import main
from llm_attribution.data.schema import Example
from llm_attribution.workflows.counterfactual import (
    RANDOM,
    SAME_CLASS,
    CounterfactualSettings,
    Group,
    baseline_orders,
    choose_groups,
    draw_source,
    group_cells,
    removal_order,
)
from llm_attribution.workflows.layout import counterfactual_dir
from llm_attribution.workflows.report.build import build_report
from tests.helpers import run_cli

WORDS = ["apple", "river", "stone", "cloud", "maple", "ember"]


def _write_toy(folder: Path, n_train: int = 24, n_test: int = 6) -> Path:
    """Each prompt's word fixes its class; the response names the class (learned in a few epochs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [
            {
                "id": f"{split}-{i}",
                "prompt": f"say {WORDS[i % 6]} {i}",
                "response": f"class c{i % 3}",
                "label": f"c{i % 3}",
            }
            for i in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _examples(labels: list[str]) -> list[Example]:
    return [Example(f"e{i}", "p", "r", label) for i, label in enumerate(labels)]


def test_groups_orders_and_baselines() -> None:
    test = _examples(["a", "b", "a", "c"])
    groups = choose_groups(test, CounterfactualSettings(labels=("a",)))
    assert groups == [Group(0, "a", (0, 2))]
    assert len(choose_groups(test, CounterfactualSettings(groups=2))) == 2
    scores = torch.tensor([[1.0, 5.0, 0.0], [9.0, 9.0, 9.0], [2.0, -4.0, 3.0], [0.0, 0.0, 0.0]])
    # summed over the group's rows 0 and 2: [3, 1, 3] -> ties kept in training order
    assert removal_order(scores, groups[0]).tolist() == [0, 2, 1]
    train = _examples(["a", "b", "a", "b", "a"])
    orders = baseline_orders(train, groups[0], seed=0)
    assert sorted(orders[RANDOM].tolist()) == [0, 1, 2, 3, 4]
    assert sorted(orders[SAME_CLASS].tolist()) == [0, 2, 4]
    assert torch.equal(baseline_orders(train, groups[0], seed=0)[RANDOM], orders[RANDOM])
    # Another draw is another permutation of the same rows (seeded, so it is the same on a rerun).
    other = [baseline_orders(train, groups[0], seed=0, draw=d)[RANDOM].tolist() for d in range(1, 6)]
    assert all(sorted(order) == [0, 1, 2, 3, 4] for order in other)
    assert any(order != orders[RANDOM].tolist() for order in other)
    assert draw_source(RANDOM, 0) == RANDOM and draw_source(RANDOM, 2) == "random-draw2"
    with pytest.raises(Exception, match="no test example has label 'z'"):
        choose_groups(test, CounterfactualSettings(labels=("z",)))


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("counterfactual")
    task = _write_toy(work / "toy")
    run = work / "run"
    argv = ["run", "--task", str(task), "--model", "embedded", "--epochs", "4", "--learning-rate", "3e-3"]
    argv += ["--batch-size", "4", "--max-length", "32", "--loss-on", "response", "--methods", "hessian-free"]
    assert main([*argv, "--out", str(run), "--quiet"]) == 0
    return run


def test_removing_a_class_removes_its_behaviour_and_random_removal_does_not(
    learned_run: Path, capsys
) -> None:
    argv = ["counterfactual", "--run", str(learned_run), "--labels", "c0", "--k", "8"]
    argv += ["--methods", "hessian-free", "--quiet", "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    record = json.loads(out)
    (group,) = record["groups"]
    assert group["n_train_of_class"] == 8 and group["full_behaviour_rate"] == 1.0
    found = {entry["source"]: entry for entry in record["results"]}
    assert set(found) == {"hessian-free", RANDOM, SAME_CLASS}
    whole_class, random = found[SAME_CLASS], found[RANDOM]
    assert whole_class["removed_share_of_class"] == 1.0  # all 8 examples of c0
    assert whole_class["behaviour_rate"] == 0.0
    assert random["behaviour_rate"] == 1.0
    assert whole_class["response_loss_change"] > random["response_loss_change"] + 1.0
    # The method's removal is its own top 8 for the group, which is what the table says it removed.
    matrix = load_file(learned_run / "scores" / "hessian-free.safetensors")["scores"]
    tests = [i for i in range(6) if i % 3 == 0]
    top = torch.argsort(matrix[tests].double().sum(0), descending=True, stable=True)[:8].tolist()
    assert found["hessian-free"]["removed_ids"] == [f"train-{i}" for i in top]

    # A rerun retrains nothing: every result file is kept as it was.
    files = sorted(counterfactual_dir(learned_run).glob("group-*/*.safetensors"))
    stamps = [path.stat().st_mtime_ns for path in files]
    code, out_again, err = run_cli(argv, capsys)
    assert code == 0, err
    assert [path.stat().st_mtime_ns for path in files] == stamps
    assert json.loads(out_again)["results"] == record["results"]


def test_random_baselines_drawn_several_times(learned_run: Path, capsys) -> None:
    argv = ["counterfactual", "--run", str(learned_run), "--labels", "c0", "--k", "8", "--draws", "2"]
    code, out, err = run_cli([*argv, "--methods", "hessian-free", "--quiet", "--json"], capsys)
    assert code == 0, err
    record = json.loads(out)
    randoms = [e for e in record["results"] if e["source"] == RANDOM]
    assert sorted(e["draw"] for e in randoms) == [0, 1]
    assert randoms[0]["removed_ids"] != randoms[1]["removed_ids"]
    # Removing the whole class is the same set in every draw: retrained once.
    assert [e["draw"] for e in record["results"] if e["source"] == SAME_CLASS] == [0]
    (summary,) = [row for row in record["baseline_draws"] if row["source"] == RANDOM]
    changes = [e["response_loss_change"] for e in randoms]
    assert summary["draws"] == 2
    assert summary["response_loss_change"]["mean"] == pytest.approx(sum(changes) / 2)
    assert summary["response_loss_change"]["min"] == min(changes)
    assert group_cells(record, "c0")[(RANDOM, 8)]["response_loss_change"] == pytest.approx(sum(changes) / 2)
    assert group_cells(record, "c0")[("hessian-free", 8)]["removed_ids"]  # a method's own entry

    # The report shows the removal curves.
    sections = {title: figures for title, _, figures in build_report(learned_run, examples=0).sections}
    title = next(t for t in sections if t.startswith("Ground truth: remove and retrain"))
    assert next(iter(sections[title].values()))[:4] == b"\x89PNG"
