"""The methods that read the training trajectory, each against its formula written out on gradients
collected by hand at every saved checkpoint: TracIn (the learning-rate-weighted sum of gradient dot
products), LESS (cosines with the training gradients' Adam updates) and TrackStar (cosines of gradients
divided by the root of Adam's second moment). In memory, streamed and for one query; each epoch's features
kept under their own key; the optimizer moments saved with each epoch equal the optimizer's own state."""

from __future__ import annotations

import math

import pytest
import torch

from llm_attribution.evaluation.score_files import read_scores
from llm_attribution.features.gradients import GradientSettings, collect_features
from llm_attribution.models.finetune import TrainSettings, epoch_learning_rates
from llm_attribution.models.moments import MOMENTS_FILE, load_moments
from llm_attribution.models.tuning import block_name
from llm_attribution.workflows.explain import ExplainSettings, explain
from llm_attribution.workflows.layout import adapter_dir
from llm_attribution.workflows.runs import open_run
from tests.helpers import run_cli, tiny_run_args

ARGS = tiny_run_args(train=20, test=4, epochs=3)


def test_epoch_learning_rates_are_the_mean_of_the_linear_decay() -> None:
    settings = TrainSettings(epochs=3, batch_size=8, learning_rate=2e-3)
    steps, total = 3, 9  # ceil(20 / 8) steps per epoch
    rates = epoch_learning_rates(settings, 20)
    for epoch in (1, 2, 3):
        # the mean of peak * (1 - s / total) over the epoch's steps s = its value at the middle step
        middle = (epoch - 1) * steps + (steps - 1) / 2
        assert rates[epoch] == pytest.approx(2e-3 * (1 - middle / total), rel=1e-12)
    assert rates[1] > rates[2] > rates[3] > 0


def _checkpoint(run, epoch: int):  # type: ignore[no-untyped-def]
    """Epoch ``epoch``'s learning rate, its moments, and its train and test gradients (float64 whole
    vectors, blocks in name order), collected from scratch."""
    loaded = open_run(run, epoch)
    config, task = loaded.config, loaded.task
    eta = epoch_learning_rates(config.train, len(task.train))[epoch]
    blocks = [
        collect_features(
            loaded.model,
            loaded.tokenizer,
            examples,
            config.prompt,
            GradientSettings(),
            weights=loaded.weights,
        ).blocks
        for examples in (task.train, task.test)
    ]
    names = sorted(blocks[0])
    train, test = (torch.cat([b[name].double() for name in names], dim=1) for b in blocks)
    moments = load_moments(adapter_dir(run, epoch))
    assert moments is not None
    first = torch.cat([moments.first[name].double() for name in names])
    second = torch.cat([moments.second[name].double() for name in names])
    [step] = {moments.steps[name] for name in names}
    return eta, (first, second, step, moments), train, test


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True)


def _explicit(run) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Each trajectory method's formula on the hand-collected gradients of every checkpoint."""
    tracin = less = 0.0
    for epoch in (1, 2, 3):
        eta, (m, v, t, moments), train, test = _checkpoint(run, epoch)
        tracin = tracin + eta * test @ train.T
        b1, b2, eps = moments.beta1, moments.beta2, moments.eps
        m_next = (b1 * m + (1 - b1) * train) / (1 - b1 ** (t + 1))
        v_next = (b2 * v + (1 - b2) * train**2) / (1 - b2 ** (t + 1))
        less = less + eta * _unit(test) @ _unit(m_next / (v_next.sqrt() + eps)).T
    scale = (v / (1 - b2**t)).sqrt() + eps  # the last checkpoint's
    trackstar = _unit(test / scale) @ _unit(train / scale).T
    return {"tracin": tracin, "less": less, "trackstar": trackstar}


def test_saved_moments_are_the_optimizers_state(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(["run", *ARGS, "--methods", "hessian-free", "--out", str(run)], capsys)
    assert code == 0, err
    state = torch.load(run / "train_state.pt", weights_only=True)["optimizer"]["state"]
    loaded = open_run(run)
    # the optimizer's parameters in training order: every LoRA matrix, as named_parameters lists them
    trained = [
        block_name(n.removesuffix(".weight")) for n, _ in loaded.model.named_parameters() if "lora_" in n
    ]
    moments = load_moments(adapter_dir(run, 3))
    assert moments is not None and set(moments.first) == set(trained) == set(loaded.weights.modules())
    for index, block in enumerate(trained):
        assert torch.equal(moments.first[block], state[index]["exp_avg"].flatten())
        assert torch.equal(moments.second[block], state[index]["exp_avg_sq"].flatten())
        assert moments.steps[block] == int(state[index]["step"]) == 9  # 3 epochs of ceil(20 / 8) steps


def test_each_method_equals_its_formula_over_checkpoints(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    methods = ("tracin", "less", "trackstar")
    argv = ["run", *ARGS, "--methods", ",".join(methods) + ",hessian-free", "--out", str(run)]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    want = _explicit(run)
    for name in methods:
        got = read_scores(run / "scores" / f"{name}.safetensors").double()
        assert float((got - want[name]).norm() / want[name].norm()) < 1e-5, name
    # hessian-free is the last checkpoint's dot product alone: tracin is more than that
    last = read_scores(run / "scores" / "hessian-free.safetensors").double()
    tracin = want["tracin"]
    assert float((tracin / tracin.norm() - last / last.norm()).norm()) > 1e-3
    keys = {p.name for p in (run / "features").glob("train-*")}
    assert len(keys) == 3  # one store per epoch; the last shared with hessian-free's

    streamed = tmp_path / "streamed"
    argv = ["run", *ARGS, "--methods", ",".join(methods), "--stream", "true", "--out", str(streamed)]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    for name in methods:
        again = read_scores(streamed / "scores" / f"{name}.safetensors").double()
        assert float((again - want[name]).norm() / want[name].norm()) < 1e-5, name

    query = open_run(run).task.test[1]
    settings = ExplainSettings(prompt=query.prompt, response=query.response, methods=methods, top=5)
    answer = explain(run, settings)
    assert list(answer.top) == list(methods)
    for name in methods:
        row = want[name][1]
        ranked = answer.top[name]
        assert [r.score for r in ranked] == pytest.approx(torch.topk(row, 5).values.tolist(), rel=1e-4), name
        assert math.isclose(ranked[0].score, float(row.max()), rel_tol=1e-4)


def test_a_run_without_moments_is_refused_in_one_line(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(["run", *ARGS, "--methods", "hessian-free", "--out", str(run)], capsys)
    assert code == 0, err
    for epoch in (1, 2, 3):  # as a run fine-tuned before the moments were kept
        (adapter_dir(run, epoch) / MOMENTS_FILE).unlink()
    for method in ("less", "trackstar"):
        code, _, err = run_cli(["attribute", "--run", str(run), "--methods", method, "--quiet"], capsys)
        assert code == 2 and f"{method} needs the optimizer's moments" in err
        assert len(err.strip().splitlines()) == 1
        assert not (run / "scores" / f"{method}.safetensors").exists()


def test_tracin_refuses_a_given_adapter(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    one_epoch = tiny_run_args(train=20, test=4, epochs=1)
    code, _, err = run_cli(["run", *one_epoch, "--methods", "hessian-free", "--out", str(run)], capsys)
    assert code == 0, err
    adapter = run / "adapters" / "epoch-1"
    other = tmp_path / "other"
    code, _, err = run_cli(
        ["run", *ARGS, "--adapter", str(adapter), "--methods", "tracin", "--out", str(other)], capsys
    )
    assert code == 2 and "tracin needs the adapter saved after every epoch" in err
    assert not (other / "results.json").exists()
