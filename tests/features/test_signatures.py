"""RepT's per-token signatures against the sample-level ones the features collect, and the token-level
view through ``explain --tokens``: the signature at a training example's prompt's last token is the one
``rept`` scores, so that token's score is the example's own; the gradient half is that of the example's
own loss (zero at the last position, whose prediction no label scores)."""

from __future__ import annotations

import pytest
import torch

from llm_attribution.cli import main
from llm_attribution.features.gradients import GradientSettings, collect_features
from llm_attribution.features.signatures import token_signatures
from llm_attribution.workflows.explain import ExplainSettings, explain
from llm_attribution.workflows.runs import open_run
from tests.helpers import run_cli, tiny_run_args


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("signatures") / "run"
    argv = ["run", *tiny_run_args("backdoor", train=20, test=3, epochs=2), "--methods", "rept"]
    assert main([*argv, "--out", str(folder)]) == 0
    return folder


def test_the_prompts_last_token_carries_the_sample_signature(run) -> None:  # type: ignore[no-untyped-def]
    loaded = open_run(run)
    examples = list(loaded.task.train[:5])
    prompt = loaded.config.prompt
    # collected two at a time there, five at once here: the batch must not change a signature
    features = collect_features(
        loaded.model,
        loaded.tokenizer,
        examples,
        prompt,
        GradientSettings(gradient_batch_size=2),
        weights=loaded.weights,
    )
    found = token_signatures(loaded.model, loaded.tokenizer, examples, prompt, loaded.weights)
    assert [t.id for t in found] == [e.id for e in examples]
    assert features.representations is not None and features.representation_gradients is not None
    width = features.representations.shape[1]
    for i, tokens in enumerate(found):
        assert tokens.signatures.shape == (len(tokens.tokens), 2 * width)
        sample = tokens.signatures[tokens.last_prompt]
        torch.testing.assert_close(sample[:width], features.representations[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sample[width:], features.representation_gradients[i], rtol=1e-4, atol=1e-9)
        gradients = tokens.signatures[:, width:]
        assert float(gradients[-1].abs().max()) == 0.0  # the last token predicts nothing scored
        assert bool((gradients[tokens.last_prompt :].abs().amax(dim=1) > 0)[:-1].all())
        assert any(tokens.in_response) and not tokens.in_response[tokens.last_prompt]


def test_explain_tokens_scores_each_top_training_examples_tokens(run, capsys) -> None:  # type: ignore[no-untyped-def]
    query = open_run(run).task.test[0]
    settings = ExplainSettings(
        prompt=query.prompt, response=query.response, methods=("rept", "hessian-free"), top=3, tokens=True
    )
    answer = explain(run, settings)
    assert set(answer.training_tokens) == {"rept"} and set(answer.tokens) == {"hessian-free"}
    for ranked in answer.top["rept"]:
        found = answer.training_tokens["rept"][ranked.id]
        assert len(found.scores) == len(found.tokens) == len(found.in_response)
        assert found.scores[found.sample_row] == pytest.approx(ranked.score, rel=1e-4)
        assert max(found.scores) <= 1.0 + 1e-6 and len(set(found.scores)) > 1

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
            "rept",
            "--top",
            "2",
            "--tokens",
            "true",
        ],
        capsys,
    )
    assert code == 0, err
    assert "tokens of #1 most like the answer besides its prompt's last token" in out
    code, _, err = run_cli(["report", str(run), "--examples", "0"], capsys)
    assert code == 0, err
    page = (run / "report.md").read_text()
    best = answer.top["rept"][0]
    found = answer.training_tokens["rept"][best.id]
    others = [i for i in range(len(found.scores)) if i != found.sample_row]
    first = max(others, key=lambda i: found.scores[i])
    table = page[page.index("| token of #1 |") :].splitlines()
    assert table[2].endswith(f"| {found.scores[first]:+.4g} |")  # the first row: the best-matching token
