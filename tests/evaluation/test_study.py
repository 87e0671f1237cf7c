"""`llm-attr study` on the tiny model: the grid, its statistics, and resuming without recomputation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llm_attribution.evaluation.grid import paired_markdown, per_class_markdown
from llm_attribution.evaluation.statistics import wilson_interval
from llm_attribution.features import store as store_module
from llm_attribution.workflows import runs as pipeline_module
from tests.helpers import run_cli

ARGS = [
    "study",
    "--tasks",
    "grammars,backdoor",
    "--seeds",
    "0,1",
    "--model",
    "tiny",
    "--epochs",
    "1",
    "--train-limit",
    "40",
    "--test-limit",
    "10",
    "--max-length",
    "48",
    "--methods",
    "hessian-free,datainf,repsim",
    "--quiet",
]


def test_study_grid_statistics_and_resume(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "study"
    code, stdout, err = run_cli([*ARGS, "--out", str(out)], capsys)
    assert code == 0, err
    record = json.loads((out / "study.json").read_text())
    assert list(record["tasks"]) == ["grammars", "backdoor"]
    for task in ("grammars", "backdoor"):
        assert (out / task / "seed-0" / "results.json").is_file() and (out / task / "seed-1").is_dir()
        for method in ("hessian-free", "datainf", "repsim"):
            cell = record["tasks"][task][method]
            for metric in (
                "accuracy",
                "coverage",
                "auc",
                "average_precision",
                "reciprocal_rank",
                "precision_at_10",
            ):
                m = cell[metric]
                assert m["ci_low"] <= m["mean"] <= m["ci_high"], (task, method, metric)
                assert m["seeds"]["n"] == 2
            assert set(cell["accuracy"]["per_class"]) <= {"clean", "trigger"} or task == "grammars"
            # The interval resamples both seeds, and accuracy's is no narrower than its Wilson interval.
            accuracy = cell["accuracy"]
            assert np.asarray(accuracy["per_seed_test"]).shape == (2, 10)
            assert "2 seed(s)" in accuracy["interval"]
            low, high = accuracy["wilson"]
            assert accuracy["ci_low"] <= low and high <= accuracy["ci_high"]
            per_test = np.mean(accuracy["per_seed_test"], axis=0)
            assert accuracy["wilson"] == pytest.approx(list(wilson_interval(per_test.sum(), 10)))
            coverage = cell["coverage"]
            assert 0 < coverage["cap"] <= 1 and coverage["mean"] <= coverage["cap"] + 1e-9
            assert cell["coverage_normalised"]["mean"] >= coverage["mean"] - 1e-9
            # The cost column: the mean over seeds of the seconds each cell's run recorded for the method.
            timed = [
                json.loads((out / task / f"seed-{s}" / "results.json").read_text())["methods"][method][
                    "seconds"
                ]
                for s in (0, 1)
            ]
            assert cell["seconds"] == {"mean": pytest.approx(sum(timed) / 2), "n": 2}
        # Every pair of methods, on both metrics, with a paired interval around its mean difference.
        pairs = record["paired"][task]
        assert len(pairs) == 3 * 2
        for pair in pairs:
            a, b = record["tasks"][task][pair["a"]], record["tasks"][task][pair["b"]]
            assert pair["mean"] == pytest.approx(a[pair["metric"]]["mean"] - b[pair["metric"]]["mean"])
            assert pair["ci_low"] <= pair["mean"] <= pair["ci_high"]
        run = json.loads((out / task / "seed-0" / "results.json").read_text())
        for method in ("hessian-free", "datainf", "repsim"):
            kept = run["methods"][method]["intervals"]
            assert kept["accuracy"][0] <= run["methods"][method]["accuracy"] <= kept["accuracy"][1]
            assert kept["coverage_k"] == run["methods"][method]["k"]
        assert len(run["paired"]) == 3 * 2
    assert "| backdoor | repsim |" in stdout and "| s per cell |" in stdout
    assert "| best by coverage | minus |" in stdout

    # Rerunning the same command trains nothing and collects no feature again.
    calls: list[str] = []
    monkeypatch.setattr(pipeline_module, "finetune", lambda *a, **k: calls.append("train"))
    original = store_module.FeatureStore.compute
    monkeypatch.setattr(
        store_module.FeatureStore,
        "compute",
        lambda self, examples, collect: original(
            self, examples, lambda c: calls.append("features") or collect(c)
        ),
    )
    code, _, err = run_cli([*ARGS, "--out", str(out)], capsys)
    assert code == 0, err
    assert calls == []
    assert json.loads((out / "study.json").read_text())["tasks"] == record["tasks"]

    # --judge-only runs nothing: it judges the complete cells and names the missing ones.
    calls.clear()
    code, stdout, err = run_cli([*ARGS, "--seeds", "0,1,5", "--judge-only", "--out", str(out)], capsys)
    assert code == 0, err
    assert calls == []
    judged = json.loads((out / "study.json").read_text())
    assert judged["missing_cells"] == ["grammars/seed-5", "backdoor/seed-5"]
    assert judged["tasks"] == record["tasks"]
    assert "not yet run" in stdout

    # The cells' kept records alone (no scores, no adapters: a grid finished over several sessions) judge
    # to the same numbers; a record made with other settings is refused in one line.
    elsewhere = tmp_path / "kept"
    for cell in out.glob("*/seed-*/cell.json"):
        target = elsewhere / cell.relative_to(out)
        target.parent.mkdir(parents=True)
        shutil.copy(cell, target)
    code, stdout, err = run_cli([*ARGS, "--judge-only", "--out", str(elsewhere)], capsys)
    assert code == 0, err
    kept = json.loads((elsewhere / "study.json").read_text())
    assert kept["missing_cells"] == [] and kept["tasks"] == record["tasks"]
    assert kept["paired"] == record["paired"]
    code, _, err = run_cli([*ARGS, "--epochs", "2", "--judge-only", "--out", str(elsewhere)], capsys)
    assert code == 2 and "other settings" in err and len(err.strip().splitlines()) == 1
    # Without --judge-only the kept records count as done cells: nothing is trained or collected again.
    calls.clear()
    code, _, err = run_cli([*ARGS, "--out", str(elsewhere)], capsys)
    assert code == 0, err
    assert calls == [] and json.loads((elsewhere / "study.json").read_text())["tasks"] == record["tasks"]
    # A method a record does not hold leaves its cell out, named as missing.
    code, _, err = run_cli(
        [*ARGS, "--methods", "hessian-free,exact", "--judge-only", "--out", str(elsewhere)], capsys
    )
    assert code == 0, err
    assert len(json.loads((elsewhere / "study.json").read_text())["missing_cells"]) == 4


def test_per_class_markdown_has_a_row_per_class_and_a_column_per_method() -> None:
    def metric(per_class: dict[str, float]) -> dict[str, object]:
        return {"per_class": per_class}

    record = {
        "tasks": {
            "backdoor": {
                "hessian-free": {
                    "accuracy": metric({"clean": 0.5, "trigger": 1.0}),
                    "coverage": metric({"clean": 0.25, "trigger": 0.75}),
                },
                "repsim": {
                    "accuracy": metric({"clean": 0.125, "trigger": 0.0}),
                    "coverage": metric({"clean": 0.5, "trigger": 0.0}),
                },
            }
        }
    }
    lines = per_class_markdown(record).splitlines()
    assert lines[2] == "| class | hessian-free | repsim |"
    assert lines[4] == "| clean | 0.50 / 0.25 | 0.12 / 0.50 |"
    assert lines[5] == "| trigger | 1.00 / 0.75 | 0.00 / 0.00 |"


def _judged(coverage: float, notes: dict[str, object] | None = None) -> dict[str, object]:
    entry: dict[str, object] = {"coverage": {"mean": coverage}}
    if notes:
        entry["notes"] = notes
    return entry


def test_paired_table_compares_against_the_best_label_blind_method() -> None:
    # knn-shapley reads the labels, so it leads coverage by construction; the table's best is the best
    # of the others, and knn-shapley appears as one of the rows compared against it.
    pairs = [
        {"a": a, "b": b, "metric": "coverage", "mean": 0.1, "ci_low": 0.05, "ci_high": 0.15, "resolved": True}
        for a, b in (("knn-shapley", "ekfac"), ("knn-shapley", "repsim"), ("ekfac", "repsim"))
    ]
    record = {
        "tasks": {
            "grammars": {
                "knn-shapley": _judged(1.0, {"uses_labels": True}),
                "ekfac": _judged(0.9),
                "repsim": _judged(0.5),
            }
        },
        "paired": {"grammars": pairs},
    }
    rows = paired_markdown(record).splitlines()[2:]
    assert [row.split(" | ")[1:3] for row in rows] == [["ekfac", "knn-shapley"], ["ekfac", "repsim"]]
    assert rows[0].split(" | ")[3].startswith("-0.100")  # ekfac minus knn-shapley: the sign turned
