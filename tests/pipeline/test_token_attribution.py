"""Per-token attribution through `explain --tokens`: for every method linear in the test gradient, the
answer tokens' shares of a top training example's score add up to that score; methods that are not
linear are refused in one line."""

from __future__ import annotations

import pytest

from llm_attribution.workflows.explain import ExplainSettings, explain
from llm_attribution.workflows.runs import open_run
from tests.helpers import run_cli, tiny_run_args

METHODS = ("hessian-free", "datainf", "exact", "kfac", "eshampoo", "tracin")


def test_token_shares_add_up_to_each_top_score(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(
        [
            "run",
            *tiny_run_args("backdoor", train=20, test=3, epochs=2),
            "--methods",
            "hessian-free",
            "--out",
            str(run),
        ],
        capsys,
    )
    assert code == 0, err
    query = open_run(run).task.test[0]
    settings = ExplainSettings(
        prompt=query.prompt, response=query.response, methods=METHODS, top=3, tokens=True
    )
    answer = explain(run, settings)
    assert list(answer.tokens) == list(METHODS)
    for name in METHODS:
        shares = answer.tokens[name]
        assert any(shares.in_response) and len(shares.tokens) == len(shares.in_response)
        for ranked in answer.top[name]:
            values = shares.shares[ranked.id]
            assert len(values) == len(shares.tokens)
            assert sum(values) == pytest.approx(ranked.score, rel=1e-4, abs=1e-9), name

    code, out, err = run_cli(
        [
            "explain",
            "--run",
            str(run),
            "--prompt",
            query.prompt,
            "--response",
            query.response,
            "--methods",
            "hessian-free",
            "--top",
            "2",
            "--tokens",
            "true",
        ],
        capsys,
    )
    assert code == 0, err
    assert "tokens of the response carrying #1's score" in out

    # the report shows every kept explanation, with the response tokens carrying #1's score, largest first
    kept = sorted((run / "explanations").glob("*.json"))
    assert len(kept) == 2  # the API call (six methods) and the command (one): different queries' keys
    code, _, err = run_cli(["report", str(run), "--examples", "0"], capsys)
    assert code == 0, err
    page = (run / "report.md").read_text()
    assert "## Explained answers" in page and "share of #1's score" in page
    shares = answer.tokens["kfac"]
    best = answer.top["kfac"][0]
    values = shares.shares[best.id]
    response = [i for i, inside in enumerate(shares.in_response) if inside]
    first = max(response, key=lambda i: abs(values[i]))
    section = page[page.index("`kfac`") :]
    table = section[section.index("| token of the response") :].splitlines()
    assert table[2].endswith(f"| {values[first]:+.4g} |")  # the first row: the largest share
    assert "<h2>Explained answers" in (run / "report.html").read_text()


def test_methods_not_linear_in_the_test_gradient_are_refused(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(
        ["run", *tiny_run_args(train=12, test=2, epochs=1), "--methods", "hessian-free", "--out", str(run)],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(
        [
            "explain",
            "--run",
            str(run),
            "--prompt",
            "p",
            "--response",
            "r",
            "--methods",
            "hessian-free,grad-cosine,repsim",
            "--tokens",
            "true",
        ],
        capsys,
    )
    assert (
        code == 2 and "--tokens needs methods whose scores are linear" in err and "grad-cosine, repsim" in err
    )
    assert len(err.strip().splitlines()) == 1


def test_explain_refuses_a_method_that_reads_the_answers_label(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(
        ["run", *tiny_run_args(train=12, test=2, epochs=1), "--methods", "knn-shapley", "--out", str(run)],
        capsys,
    )
    assert code == 0, err  # through run it scores: the test examples have labels
    code, _, err = run_cli(
        ["explain", "--run", str(run), "--prompt", "p", "--methods", "knn-shapley"], capsys
    )
    assert code == 2 and "knn-shapley values training examples by the test example's class label" in err
