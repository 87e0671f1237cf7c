"""MAGIC in the pipeline: `run` scores it as minus the metagradients of the replayed run (in memory and
with --stream alike), `explain` gives one test example's row, results and tables say what was computed,
and the runs it cannot replay (an adapter trained elsewhere) or the views it has no meaning in (per-token
shares, the convergence diagnostic) are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from llm_attribution.evaluation.score_files import read_scores
from llm_attribution.workflows.explain import ExplainSettings, explain
from llm_attribution.workflows.replay import open_replay
from llm_attribution.workflows.runs import open_run
from tests.helpers import run_cli, tiny_run_args

ARGS = tiny_run_args(train=20, test=4, epochs=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("magic") / "run"
    from llm_attribution.cli import main

    assert main(["run", *ARGS, "--methods", "hessian-free,magic", "--out", str(folder)]) == 0
    return folder


def test_run_scores_magic_as_minus_the_replayed_metagradients(run) -> None:  # type: ignore[no-untyped-def]
    loaded = open_run(run)
    replay = open_replay(loaded)
    assert replay.saved_difference is not None and replay.saved_difference < 1e-5  # the replay is the run
    want = -replay.metagradients(loaded.task.test)
    got = read_scores(run / "scores" / "magic.safetensors").double()
    assert got.shape == (4, 20)
    assert float((got - want).norm() / want.norm()) < 1e-5
    record = json.loads((run / "results.json").read_text())["methods"]["magic"]
    assert record["notes"]["steps"] == 6  # 2 epochs of ceil(20 / 8) steps
    assert record["notes"]["seconds_per_query"] > 0
    # not the gradient dot product under another name
    dot = read_scores(run / "scores" / "hessian-free.safetensors").double()
    assert float(torch.corrcoef(torch.stack([dot.flatten(), got.flatten()]))[0, 1]) < 0.999


def test_streamed_and_explained_scores_are_the_same(run, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    streamed = tmp_path / "streamed"
    argv = ["run", *ARGS, "--methods", "magic", "--stream", "true", "--out", str(streamed)]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "magic (through 6 replayed steps)" in out
    want = read_scores(run / "scores" / "magic.safetensors").double()
    again = read_scores(streamed / "scores" / "magic.safetensors").double()
    assert float((again - want).norm() / want.norm()) < 1e-5

    query = open_run(run).task.test[2]
    answer = explain(
        run, ExplainSettings(prompt=query.prompt, response=query.response, methods=("magic",), top=5)
    )
    scores = [r.score for r in answer.top["magic"]]
    assert scores == pytest.approx(torch.topk(want[2], 5).values.tolist(), rel=1e-4, abs=1e-9)


def test_what_magic_cannot_do_is_refused_in_one_line(run, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    adopted = tmp_path / "adopted"
    argv = [
        "run",
        *ARGS,
        "--adapter",
        str(run / "adapters" / "epoch-2"),
        "--methods",
        "magic",
        "--out",
        str(adopted),
    ]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "magic replays the fine-tuning run" in err and len(err.strip().splitlines()) == 1
    assert not adopted.exists()
    query = open_run(run).task.test[0]
    code, _, err = run_cli(
        ["explain", "--run", str(run), "--prompt", query.prompt, "--methods", "magic", "--tokens", "true"],
        capsys,
    )
    assert code == 2 and "--tokens" in err and len(err.strip().splitlines()) == 1


def test_lds_and_the_report_judge_magic_like_every_method(run, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(
        ["lds", "--run", str(run), "--subsets", "4", "--methods", "hessian-free,magic"], capsys
    )
    assert code == 0, err
    record = json.loads((run / "lds" / "lds.json").read_text())
    entry = record["losses"]["attributed"]["methods"]["magic"]
    assert len(entry["per_test"]) == 4 and entry["mean"] == pytest.approx(
        sum(v for v in entry["per_test"] if v is not None) / sum(v is not None for v in entry["per_test"])
    )
    code, _, err = run_cli(["report", str(run), "--examples", "0"], capsys)
    assert code == 0, err
    assert "magic (through 6 replayed steps)" in (run / "report.md").read_text()
