"""`llm-attr lds` on a tiny run: the retrained losses carry the subsets' effect, a killed lds resumes to
identical numbers, and worker processes give the numbers one process gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_attribution.evaluation.lds import difference_in_means, lds_per_test, subset_masks
from llm_attribution.workflows.layout import LDS_FILE, lds_dir, lds_subset_file
from llm_attribution.workflows.lds import lds_lines
from llm_attribution.workflows.retraining import read_result
from tests.helpers import run_cli, tiny_run_args

SUBSETS = 12
METHODS = "hessian-free,exact"
LDS_ARGS = ["--subsets", str(SUBSETS), "--methods", METHODS, "--quiet"]


def _numbers(record: dict) -> dict:
    """Everything of lds.json that is a result (timings and versions left out)."""
    return {"losses": record["losses"], "subset_size": record["subset_size"], "seeds": record["seeds"]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    run = tmp_path_factory.mktemp("lds") / "run"
    argv = ["run", *tiny_run_args("backdoor", train=16, test=6), "--learning-rate", "3e-3"]
    code = subprocess.run(
        [sys.executable, "-m", "llm_attribution.cli.main", *argv, "--methods", METHODS, "--out", str(run)],
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stderr
    return run


@pytest.fixture(scope="module")
def measured(tiny_run: Path, tmp_path_factory) -> tuple[Path, dict]:  # type: ignore[no-untyped-def]
    run = tmp_path_factory.mktemp("lds-one") / "run"
    shutil.copytree(tiny_run, run)
    code = subprocess.run(
        [sys.executable, "-m", "llm_attribution.cli.main", "lds", "--run", str(run), *LDS_ARGS, "--json"],
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stderr
    return run, json.loads(code.stdout)


def test_lds_table_has_every_method_control_and_the_ceiling(measured: tuple[Path, dict]) -> None:
    run, record = measured
    assert record == json.loads((lds_dir(run) / LDS_FILE).read_text()) | {"cost": record["cost"]}
    table = record["losses"]["attributed"]
    assert set(table["methods"]) == {"hessian-free", "exact", "constant", "random", "label-oracle"}
    assert table["methods"]["constant"]["mean"] == 0.0  # equal-size subsets: a constant predicts nothing
    assert len(table["noise_ceiling"]["per_test"]) == 6
    assert record["subset_size"] == 8 and record["seeds"] == [0, 1]
    assert not (lds_dir(run) / "work").exists()  # training states are removed when retrains are done
    assert set(record["method_settings"]) == {"hessian-free", "exact"}  # which variant each LDS is of
    assert record["method_settings"]["exact"]["damping_scale"] == 0.1


def test_the_printed_table_says_what_an_unconverged_method_computed(measured: tuple[Path, dict]) -> None:
    _, record = measured
    notes = {"depth": 1000, "converged": False, "blocks_not_converged": 3, "blocks": 4, "steps_needed": 9}
    lines = lds_lines(record | {"method_notes": {"exact": notes}})
    assert "  exact = exact (depth 1000, not converged on 3 of 4 blocks)" in lines
    assert not any(" = " in line for line in lds_lines(record))  # neither of these two has notes


def test_the_measured_effect_predicts_the_losses_and_random_scores_do_not(
    measured: tuple[Path, dict],
) -> None:
    """The losses follow the subsets: the effect measured on these subsets (mean loss without an example
    minus with it) ranks them far better than random scores, which are near 0."""
    run, record = measured
    masks = subset_masks(16, 0.5, 0, range(SUBSETS))
    losses = torch.stack([read_result(lds_subset_file(run, 0, i)).attributed for i in range(SUBSETS)])
    oracle = lds_per_test(difference_in_means(masks, losses), masks, losses).mean()
    random = record["losses"]["attributed"]["methods"]["random"]["mean"]
    assert oracle > 0.75
    assert abs(random) < 0.35  # 6 tests x 12 subsets: sd of the mean about 0.09
    assert oracle > max(
        record["losses"]["attributed"]["methods"][m]["mean"] for m in ("hessian-free", "exact")
    )
    # Shuffling which losses belong to which subset destroys it: the pairing is what carries the signal.
    shuffled = losses[torch.randperm(SUBSETS, generator=torch.Generator().manual_seed(0))]
    assert lds_per_test(difference_in_means(masks, losses), masks, shuffled).mean() < oracle - 0.4


def test_killed_lds_resumes_to_identical_numbers(
    tiny_run: Path, measured: tuple[Path, dict], tmp_path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    env = os.environ | {"LLM_ATTR_PAUSE_AT": "retrain-result:4"}
    argv = [sys.executable, "-m", "llm_attribution.cli.main", "lds", "--run", str(run), *LDS_ARGS, "--json"]
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if "paused at retrain-result:4" in line:
            break
    process.kill()
    process.wait()
    done = sorted((lds_dir(run)).glob("seed-*/subset-*.safetensors"))
    assert len(done) == 3  # three retrains finished, the fourth killed before its file
    stamps = {path: path.stat().st_mtime_ns for path in done}
    time.sleep(0.01)
    again = subprocess.run(argv, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert {path: path.stat().st_mtime_ns for path in done} == stamps  # resumed, not redone
    assert _numbers(json.loads(again.stdout)) == _numbers(measured[1])


def test_scoring_one_more_method_keeps_the_others_in_the_record(
    measured: tuple[Path, dict], tmp_path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(measured[0], run)  # its retrains are done: this call only scores
    code, out, err = run_cli(
        ["lds", "--run", str(run), *LDS_ARGS[:2], "--methods", "exact", "--json"], capsys
    )
    assert code == 0, err
    record, before = json.loads(out), measured[1]
    assert record["methods"] == ["hessian-free", "exact"]  # kept from the earlier call, in its order
    for kind in ("attributed", "response"):
        assert (
            record["losses"][kind]["methods"]["hessian-free"]
            == before["losses"][kind]["methods"]["hessian-free"]
        )
    assert record["method_settings"] == before["method_settings"]
    assert json.loads((lds_dir(run) / LDS_FILE).read_text())["methods"] == ["hessian-free", "exact"]
    # 3 of the subsets without the ceiling: other retrains' LDS, so nothing is carried over
    args = ["lds", "--run", str(run), "--subsets", "3", "--methods", "exact", "--ceiling", "false", "--json"]
    code, out, err = run_cli([*args, "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(out)["methods"] == ["exact"]


def test_two_workers_give_the_numbers_of_one(
    tiny_run: Path, measured: tuple[Path, dict], tmp_path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, out, err = run_cli(["lds", "--run", str(run), *LDS_ARGS, "--workers", "2", "--json"], capsys)
    assert code == 0, err
    two, one = json.loads(out), measured[1]
    for kind in ("attributed", "response"):
        for name, entry in one["losses"][kind]["methods"].items():
            assert np.allclose(
                two["losses"][kind]["methods"][name]["per_test"], entry["per_test"], equal_nan=True
            )
    losses = [read_result(lds_subset_file(run, 0, i)).attributed for i in range(SUBSETS)]
    reference = [read_result(lds_subset_file(measured[0], 0, i)).attributed for i in range(SUBSETS)]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(losses, reference, strict=True))


def test_other_subset_settings_in_the_same_folder_are_refused(measured: tuple[Path, dict], capsys) -> None:
    run, _ = measured
    code, _, err = run_cli(["lds", "--run", str(run), *LDS_ARGS, "--fraction", "0.25"], capsys)
    assert code == 2
    assert "holds subsets of fraction 0.5" in err


def test_damping_sweep_reports_accuracy_coverage_and_lds_of_each_damping(measured: tuple[Path, dict]) -> None:
    """The sweep's quality numbers are those of the method rescored at that damping, judged afresh."""
    from llm_attribution.api import run_features
    from llm_attribution.attribution.registry import get_method
    from llm_attribution.evaluation.metrics import evaluate
    from llm_attribution.workflows.diagnose import IhvpSweepSettings, diagnose_ihvp
    from llm_attribution.workflows.runs import open_run

    run, _ = measured
    points, _ = diagnose_ihvp(run, IhvpSweepSettings(damping_scales=(0.01, 1.0), methods=("datainf",)))
    task = open_run(run).task
    train, test = run_features(run)
    masks = subset_masks(16, 0.5, 0, range(SUBSETS))
    losses = torch.stack([read_result(lds_subset_file(run, 0, i)).attributed for i in range(SUBSETS)])
    for point in points:
        scores = get_method("exact", damping_scale=point.damping_scale).score(train.blocks, test.blocks)
        metrics = evaluate(scores, [e.label for e in task.train], [e.label for e in task.test])
        quality = point.quality["exact"]
        assert quality["accuracy"] == metrics.accuracy and quality["coverage"] == metrics.coverage
        assert quality["lds"] == pytest.approx(float(np.nanmean(lds_per_test(scores, masks, losses))))
    assert points[0].quality["exact"]["lds"] != points[1].quality["exact"]["lds"]  # the damping matters


def test_curvature_references_get_their_lds_beside_the_methods_on_the_same_rows(
    measured: tuple[Path, dict], capsys
) -> None:
    from safetensors.torch import load_file

    run, _ = measured
    code, _, err = run_cli(
        ["curvature", "--run", str(run), "--kinds", "fisher", "--test-examples", "3", "--quiet"], capsys
    )
    assert code == 0, err
    code, out, err = run_cli(["lds", "--run", str(run), *LDS_ARGS, "--json"], capsys)
    assert code == 0, err
    reference = json.loads(out)["losses"]["attributed"]["curvature_references"]["fisher"]
    tensors = load_file(run / "curvature" / "fisher.safetensors")
    rows = tensors["test_rows"].tolist()
    masks = subset_masks(16, 0.5, 0, range(SUBSETS))
    losses = torch.stack([read_result(lds_subset_file(run, 0, i)).attributed for i in range(SUBSETS)])
    expected = lds_per_test(tensors["scores"].double(), masks, losses[:, rows])
    assert np.allclose(reference["per_test"], expected) and reference["test_rows"] == rows
    exact = load_file(run / "scores" / "exact.safetensors")["scores"][rows]
    assert reference["same_rows"]["exact"] == pytest.approx(
        float(np.nanmean(lds_per_test(exact, masks, losses[:, rows])))
    )


def test_report_shows_the_lds_table_and_figure(measured: tuple[Path, dict]) -> None:
    from llm_attribution.workflows.report.build import build_report

    run, record = measured
    sections = {title: (text, figures) for title, text, figures in build_report(run, examples=0).sections}
    title = next(t for t in sections if t.startswith("Ground truth: LDS"))
    text, figures = sections[title]
    exact = record["losses"]["attributed"]["methods"]["exact"]
    assert f"| exact | {exact['mean']:.3f} [{exact['ci95'][0]:.3f}, {exact['ci95'][1]:.3f}]" in text
    assert "noise ceiling" in text and next(iter(figures)).startswith("lds-")
    assert next(iter(figures.values()))[:4] == b"\x89PNG"
    # The trust section counts each verdict over the test examples and, with an LDS, gives its mean LDS.
    results = json.loads((run / "results.json").read_text())["methods"]
    title = next(t for t in sections if t.startswith("Should these rankings be trusted?"))
    text = sections[title][0]
    verdicts = np.array(results["exact"]["trust"]["verdicts"])
    per_test = np.array(exact["per_test"])
    cells = []
    for verdict in ("low", "medium", "high"):
        chosen = verdicts == verdict
        mean = f" ({np.nanmean(per_test[chosen]):.2f})" if chosen.any() else ""
        cells.append(f"{int(chosen.sum())}{mean}")
    assert "| exact | " + " | ".join(cells) + " |" in text
