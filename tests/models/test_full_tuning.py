"""Full fine-tuning (``--tuning full``): the base model's linear weights are trained instead of LoRA, saved
per epoch, resumed after a kill, loaded back, and their per-example gradients are projected while collected
(LoGra-style) to exactly ``P_out G P_in^T`` of the brute-force gradient ``G``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from llm_attribution.core.errors import ConfigError, ModelError
from llm_attribution.data import DataSettings
from llm_attribution.data.templates import PromptSettings, collate, encode_examples
from llm_attribution.features.gradients import GradientSettings, collect_features, per_example_losses
from llm_attribution.models import finetune as finetune_module
from llm_attribution.models.finetune import TrainSettings
from llm_attribution.models.resolve import load_model
from llm_attribution.models.settings import FULL_TARGETS, LoraSettings, ModelSettings
from llm_attribution.models.tuning import FULL_WEIGHTS, FullWeights
from llm_attribution.workflows.features import RunFeatures
from llm_attribution.workflows.layout import adapter_dir, saved_epochs
from llm_attribution.workflows.runs import FinetuneConfig, finetune_run, open_run, select_epoch
from tests.helpers import run_cli, tiny_run_args, toy_task

PROMPT = PromptSettings(max_length=40)
FULL = LoraSettings(tuning="full")
CONFIG = FinetuneConfig(
    data=DataSettings(task="grammars", train_limit=16, test_limit=4),
    model=ModelSettings(model="tiny", device="cpu"),
    lora=FULL,
    prompt=PromptSettings(max_length=48),
    train=TrainSettings(epochs=2, batch_size=4, learning_rate=1e-3, seed=3),
)


@pytest.fixture(scope="module")
def full_model():
    loaded = load_model(ModelSettings(model="tiny", device="cpu"))
    weights = FullWeights(loaded.model, FULL_TARGETS)
    loaded.model.eval()
    return loaded.model, loaded.tokenizer, weights


def _brute_force(model, tokenizer, examples, modules) -> dict[str, list[torch.Tensor]]:
    """Each example's full ``d_out x d_in`` gradient of every module, one backward per example."""
    params = [m.weight for m in modules.values()]
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    for enc in encode_examples(examples, tokenizer, PROMPT):
        batch = collate([enc], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        loss, _ = per_example_losses(model(**batch).logits, labels)
        for name, grad in zip(modules, torch.autograd.grad(loss.sum(), params), strict=True):
            rows[name].append(grad)
    return rows


def test_projected_full_gradients_are_the_projected_brute_force_gradients(full_model) -> None:
    model, tokenizer, weights = full_model
    modules = weights.modules()
    assert len(modules) == 2 * len(FULL_TARGETS)  # every attention and MLP projection of both layers
    assert "layers.0.self_attn.q_proj" in modules and "layers.1.mlp.down_proj" in modules
    examples = toy_task(n_train=7).train
    settings = GradientSettings(gradient_batch_size=3, projection_dim=16)
    got = collect_features(model, tokenizer, examples, PROMPT, settings, weights=weights)
    reference = _brute_force(model, tokenizer, examples, modules)
    projector = settings.projector()
    assert projector is not None
    for name, module in modules.items():
        d_out, d_in = module.weight.shape
        block = projector.block(name, d_out, d_in)
        # the projection really happened: a 4 x 4 block of a 64 x 64 (or wider) matrix, both sides projected
        assert got.shapes[name] == block.shape == (4, 4) and block.out is not None and block.inp is not None
        for row, grad in enumerate(reference[name]):
            expected = block.out @ grad @ block.inp.T  # P_out G P_in^T
            projected = got.blocks[name][row].view(block.shape)
            assert torch.allclose(projected, expected, rtol=1e-4, atol=1e-6), (name, row)


def test_full_gradients_are_never_formed_unprojected(full_model) -> None:
    model, tokenizer, weights = full_model
    examples = toy_task(n_train=2).train
    with pytest.raises(ConfigError, match="--projection-dim"):
        collect_features(model, tokenizer, examples, PROMPT, GradientSettings(), weights=weights)
    with pytest.raises(ConfigError, match=r"mlp\.gate_proj"):  # 128 x 64 = 8192 numbers: kept whole
        collect_features(
            model, tokenizer, examples, PROMPT, GradientSettings(projection_dim=10**6), weights=weights
        )
    with pytest.raises(ModelError, match="full-targets"):
        FullWeights(model, ("q_proj", "no_such_proj"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    run = tmp_path_factory.mktemp("full") / "run"
    return run, finetune_run(CONFIG, run)


def test_full_finetuning_trains_the_base_weights_only(full_run) -> None:
    run, report = full_run
    assert saved_epochs(run) == [1, 2] and report.curve.epochs[-1] < report.curve.epochs[0]
    assert not any("lora" in name for name, _ in report.loaded_run.model.named_parameters())
    base = load_model(ModelSettings(model="tiny", device="cpu")).model.state_dict()
    trained = report.loaded_run.model.state_dict()
    saved = load_file(str(adapter_dir(run, 2) / FULL_WEIGHTS))
    assert len(saved) == 2 * len(FULL_TARGETS)
    for name, tensor in trained.items():
        if name in saved:  # a trained weight: changed, and saved as it is
            assert not torch.equal(tensor, base[name]), name
            assert torch.equal(saved[name], tensor), name
        else:  # embeddings, norms: frozen
            assert torch.equal(tensor, base[name]), name
    assert json.loads((run / "settings.json").read_text())["lora"]["tuning"] == "full"


def test_a_full_run_reopens_at_any_epoch(full_run) -> None:
    run, report = full_run
    batch = collate(encode_examples(toy_task().test, report.loaded_run.tokenizer, PROMPT), 2)
    with torch.no_grad():
        expected = report.loaded_run.model(**batch).logits
        opened = open_run(run)
        assert torch.equal(opened.model(**batch).logits, expected)
        first = select_epoch(opened, 1)
        epoch_1 = load_file(str(adapter_dir(run, 1) / FULL_WEIGHTS))
        assert all(torch.equal(first.model.state_dict()[k], v) for k, v in epoch_1.items())
        assert not torch.equal(first.model(**batch).logits, expected)
    again = finetune_run(CONFIG, run)  # same settings: the saved epochs are reused, not retrained
    assert again.reused
    with torch.no_grad():
        assert torch.equal(again.loaded_run.model(**batch).logits, expected)


def test_full_and_lora_features_are_kept_apart(full_run) -> None:
    run, _ = full_run
    loaded_run = open_run(run)
    gradients = GradientSettings(projection_dim=16)
    features = RunFeatures(loaded_run, CONFIG.prompt, gradients, CONFIG.model)
    assert features.identity["tuning"] == "full"
    train = features.load("train")
    assert set(train.blocks) == set(loaded_run.weights.modules())
    assert all(block.shape[1] <= 16 for block in train.blocks.values())


class Crash(Exception):
    pass


@pytest.mark.parametrize(("epoch", "step"), [(1, 0), (0, 2)])
def test_a_killed_full_run_resumes_to_the_same_weights(full_run, tmp_path, monkeypatch, epoch, step) -> None:
    whole, report = full_run
    config = dataclasses.replace(CONFIG, train=dataclasses.replace(CONFIG.train, checkpoint_minutes=0.0))
    original = finetune_module._save_state

    def crashing(path, state):  # type: ignore[no-untyped-def]
        original(path, state)
        if (state["epoch"], state["step"]) == (epoch, step):
            monkeypatch.setattr(finetune_module, "_save_state", original)
            raise Crash

    monkeypatch.setattr(finetune_module, "_save_state", crashing)
    with pytest.raises(Crash):
        finetune_run(config, tmp_path / "cut")
    resumed = finetune_run(config, tmp_path / "cut")
    assert not resumed.reused and resumed.curve.steps == report.curve.steps
    for e in (1, 2):
        a = load_file(str(adapter_dir(whole, e) / FULL_WEIGHTS))
        b = load_file(str(adapter_dir(tmp_path / "cut", e) / FULL_WEIGHTS))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), e


def test_cli_runs_every_method_on_projected_full_gradients(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = ["run", *tiny_run_args(train=30, test=6), "--out", str(out), "--tuning", "full"]
    args += ["--learning-rate", "1e-3", "--projection-dim", "16"]
    code, stdout, err = run_cli([*args, "--methods", "hessian-free,datainf,exact,repsim"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    for method in ("hessian-free", "datainf", "exact", "repsim"):
        row = results["methods"][method]
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["coverage"] <= 1.0, method
    assert "datainf" in stdout


def test_cli_refuses_unprojected_full_gradients_and_leaves_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = ["run", *tiny_run_args(train=12, test=4, epochs=1), "--out", str(out), "--tuning", "full"]
    code, _, err = run_cli([*args, "--methods", "hessian-free"], capsys)
    assert code == 2 and "--projection-dim" in err and err.count("\n") == 1
    assert not out.exists()


def test_parameter_change_of_a_full_run_is_against_the_base_weights(full_run) -> None:
    from llm_attribution.workflows.parameters import parameters_vs_behaviour

    run, report = full_run
    rows = parameters_vs_behaviour(run)
    base = load_model(ModelSettings(model="tiny", device="cpu")).model.state_dict()
    trained = report.loaded_run.model.state_dict()
    name = "layers.0.self_attn.q_proj"
    key = f"model.{name}.weight"
    assert [row.epoch for row in rows] == [1, 2]
    assert set(rows[-1].update_norm_by_module) == set(report.loaded_run.weights.modules())
    expected = float(torch.linalg.matrix_norm(trained[key].double() - base[key].double()))
    assert rows[-1].update_norm_by_module[name] == pytest.approx(expected, rel=1e-9)
