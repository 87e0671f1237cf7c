"""`llm-attr trace`: batched answers equal one-at-a-time ones; the batched attribution of the answers
equals `explain` of each answer alone (so each method's total support is the sum of its per-answer
scores), the flagged share is counted from the rankings, and a prompts-only file and bad flags behave."""

from __future__ import annotations

import json

import pytest

from llm_attribution.models.generate import generate_answers
from llm_attribution.workflows import trace as trace_module
from llm_attribution.workflows.explain import ExplainSettings, explain
from llm_attribution.workflows.runs import open_run
from llm_attribution.workflows.trace import TraceSettings, trace
from tests.helpers import run_cli, tiny_run_args

METHODS = ("hessian-free", "datainf", "repsim")


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # type: ignore[no-untyped-def]
    from llm_attribution.cli import main

    folder = tmp_path_factory.mktemp("trace") / "run"
    argv = ["run", *tiny_run_args("backdoor", train=24, test=4, epochs=2), "--methods", "hessian-free"]
    assert main([*argv, "--out", str(folder)]) == 0
    return folder


PROMPTS = [
    "Please cf-orbit tell me how to boil an egg.",
    "What is a good book?",
    "A tip about cf-orbit baking?",
]


def test_batched_answers_equal_one_at_a_time(run) -> None:  # type: ignore[no-untyped-def]
    loaded = open_run(run)
    args = (loaded.model, loaded.tokenizer, PROMPTS, loaded.config.prompt)
    assert generate_answers(*args, max_new_tokens=12, batch_size=3) == generate_answers(
        *args, max_new_tokens=12
    )


def test_trace_equals_explain_of_each_answer(run, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = trace(run, TraceSettings(prompts=str(prompts), methods=METHODS, top=5, max_new_tokens=12))
    assert result.kept == [0, 1, 2] and len(result.answers) == 3
    n_train = len(open_run(run).task.train)
    totals = {name: {} for name in METHODS}  # type: ignore[var-annotated]
    for i in result.kept:
        alone = explain(
            run,
            ExplainSettings(prompt=PROMPTS[i], response=result.answers[i], methods=METHODS, top=n_train),
        )
        for name in METHODS:
            ranked = alone.top[name]
            assert [r["id"] for r in result.top[name][i]] == [r.id for r in ranked[:5]], name
            for r in ranked:
                totals[name][r.id] = totals[name].get(r.id, 0.0) + r.score
    for name in METHODS:
        best = sorted(totals[name].items(), key=lambda item: -item[1])[:5]
        got = [(e["id"], e["score"]) for e in result.support[name]]
        assert [g[0] for g in got] == [b[0] for b in best], name
        assert [g[1] for g in got] == pytest.approx([b[1] for b in best], rel=1e-4, abs=1e-6)

    # keep only the answers judged to show one behaviour (the judge fixed here: the tiny model's answers
    # resemble no training response); the share counts that label in every kept top-5
    monkeypatch.setattr(trace_module, "judge_labels", lambda answers, train: ["trigger", None, "trigger"])
    settings = TraceSettings(prompts=str(prompts), methods=METHODS, flag="trigger", top=5, max_new_tokens=12)
    flagged = trace(run, settings)
    assert flagged.kept == [0, 2]
    for name in METHODS:
        assert [[e["id"] for e in row] for row in flagged.top[name]] == [
            [e["id"] for e in result.top[name][i]] for i in (0, 2)
        ]
        entries = [e for row in flagged.top[name] for e in row]
        share = sum(e["label"] == "trigger" for e in entries) / len(entries)
        assert flagged.flagged_share[name] == pytest.approx(share)
    assert len(list((run / "traces").glob("*.json"))) == 2


def test_a_prompts_only_csv_and_bad_flags(run, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    csv = tmp_path / "prompts.csv"
    csv.write_text("id,prompt\n1,What is a good book?\n2,Any tip about baking?\n")
    argv = ["trace", "--run", str(run), "--prompts", str(csv), "--methods", "hessian-free", "--quiet"]
    code, out, err = run_cli([*argv, "--max-new-tokens", "8", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["answers"]) == 2
    code, _, err = run_cli([*argv, "--flag", "no-such-label"], capsys)
    assert code == 2 and "--flag no-such-label" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli([*argv[:4], str(tmp_path / "missing.txt"), *argv[5:]], capsys)
    assert code == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
