"""``llm-attr curvature`` on a finished tiny run: the files it writes, and the ``fisher`` kind's scores
against a dense solve of the full damped empirical Fisher built from the run's own gradients."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llm_attribution.api import CurvatureSettings, curvature
from llm_attribution.cli import main
from llm_attribution.core.errors import ConfigError
from llm_attribution.workflows.diagnose import run_features
from llm_attribution.workflows.layout import curvature_file, curvature_scores_file
from tests.helpers import run_cli

N_TRAIN, N_TEST = 24, 7


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("curvature") / "run"
    args = [
        "--task",
        "grammars",
        "--model",
        "tiny",
        "--train-limit",
        str(N_TRAIN),
        "--test-limit",
        str(N_TEST),
    ]
    args += ["--epochs", "1", "--max-length", "48", "--quiet", "--out", str(folder)]
    assert main(["finetune", *args]) == 0
    return folder


def test_cli_fisher_scores_equal_a_dense_solve(run, capsys) -> None:  # type: ignore[no-untyped-def]
    flags = ["--kinds", "fisher", "--test-examples", "3", "--tolerance", "1e-9", "--damping-scale", "0.5"]
    code, out, err = run_cli(["curvature", "--run", str(run), *flags, "--json", "--quiet"], capsys)
    assert code == 0, err
    record = json.loads(out)
    assert record == json.loads(curvature_file(run).read_text())
    assert record["test_rows"] == [0, 3, 6] and set(record["kinds"]) == {"fisher"}
    train, test = run_features(run)
    blocks = list(train.blocks)
    g = torch.cat([train.blocks[b] for b in blocks], dim=1).double()
    v = torch.cat([test.blocks[b][[0, 3, 6]] for b in blocks], dim=1).double()
    assert record["parameters"] == g.shape[1] and record["n_train"] == N_TRAIN
    fisher = g.T @ g / N_TRAIN
    lam = 0.5 * float(fisher.diagonal().mean())  # the recorded convention: scale x trace(F) / D
    row = record["kinds"]["fisher"]
    assert row["damping"]["lambda"] == pytest.approx(lam, rel=1e-9)
    assert max(row["relative_residual"]) < 1e-8 and row["converged"] == [True] * 3
    assert max(row["iterations"]) <= N_TRAIN + 5  # rank n_train plus damping
    saved = load_file(curvature_scores_file(run, "fisher"))
    assert saved["scores"].shape == (3, N_TRAIN) and saved["scores"].dtype == torch.float32
    assert saved["test_rows"].tolist() == [0, 3, 6] and saved["test_rows"].dtype == torch.int64
    expected = torch.linalg.solve(fisher + lam * torch.eye(g.shape[1], dtype=torch.float64), v.T).T @ g.T
    got = saved["scores"].double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_api_model_curvatures_share_the_damping_and_report_each_solve(run) -> None:  # type: ignore[no-untyped-def]
    settings = CurvatureSettings(kinds=("hessian", "gauss-newton"), test_examples=2, max_iterations=2)
    result = curvature(run, settings)
    kinds = result.record["kinds"]
    assert set(kinds) == set(result.scores) == {"hessian", "gauss-newton"}
    assert kinds["hessian"]["damping"]["lambda"] == kinds["gauss-newton"]["damping"]["lambda"] > 0
    assert not curvature_scores_file(run, "fisher").exists()  # the record describes the files there
    for row in kinds.values():
        assert len(row["relative_residual"]) == len(row["iterations"]) == len(row["negative_curvature"]) == 2
        assert all(0 < it <= 2 for it in row["iterations"])
    assert not any(kinds["gauss-newton"]["negative_curvature"])  # PSD + lambda > 0 never bends
    hessian = load_file(curvature_scores_file(run, "hessian"))["scores"]
    gauss_newton = load_file(curvature_scores_file(run, "gauss-newton"))["scores"]
    assert hessian.shape == gauss_newton.shape == (2, N_TRAIN)
    assert not torch.allclose(hessian, gauss_newton, rtol=1e-2)


def test_api_own_damping_is_recorded(run) -> None:  # type: ignore[no-untyped-def]
    settings = CurvatureSettings(
        kinds=("gauss-newton",), test_examples=1, damping_basis="own", probes=3, max_iterations=2
    )
    row = curvature(run, settings).record["kinds"]["gauss-newton"]
    assert row["damping"]["basis"] == "own" and row["damping"]["estimate"] == "hutchinson"
    assert row["damping"]["lambda"] == pytest.approx(0.1 * row["damping"]["mean_diagonal"])
    assert row["iterations"] == [2] and row["converged"] == [False]


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(ConfigError):
        CurvatureSettings(kinds=("newton",))
    with pytest.raises(ConfigError):
        CurvatureSettings(tolerance=0.0)
