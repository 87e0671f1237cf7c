"""`diagnose convergence` and `diagnose parameters` on a tiny backdoor run with two epochs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llm_attribution.cli import main
from llm_attribution.data.schema import Example
from llm_attribution.diagnostics.behaviour import judge_labels
from llm_attribution.diagnostics.convergence import gradient_cosine
from llm_attribution.features.gradients import Features
from llm_attribution.models.lora import adapter_update_norms
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("diag") / "bd"
    argv = [
        "finetune",
        "--task",
        "backdoor",
        "--model",
        "tiny",
        "--epochs",
        "2",
        "--train-limit",
        "40",
        "--test-limit",
        "6",
        "--learning-rate",
        "3e-3",
        "--quiet",
        "--out",
        str(run),
    ]
    assert main(argv) == 0
    return run


def test_convergence_rows_per_epoch(two_epoch_run, capsys) -> None:
    code, _out, err = run_cli(
        [
            "diagnose",
            "convergence",
            "--run",
            str(two_epoch_run),
            "--methods",
            "hessian-free,repsim",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    rows = json.loads((two_epoch_run / "diagnostics" / "convergence.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["gradient_cosine_with_previous"] is None
    assert -1.0 <= rows[1]["gradient_cosine_with_previous"] <= 1.0
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert set(rows[1]["methods"]) == {"hessian-free", "repsim"}


def test_parameters_rows_per_epoch(two_epoch_run, capsys) -> None:
    code, _, err = run_cli(
        ["diagnose", "parameters", "--run", str(two_epoch_run), "--generations", "2", "--quiet"], capsys
    )
    assert code == 0, err
    rows = json.loads((two_epoch_run / "diagnostics" / "parameters.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["trigger_rate"] is not None and 0.0 <= r["trigger_rate"] <= 1.0 for r in rows)
    assert rows[1]["update_norm_total"] > 0


def test_update_norm_is_the_scaled_product(two_epoch_run) -> None:
    adapter = two_epoch_run / "adapters" / "epoch-1"
    norms = adapter_update_norms(adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in weights if ".lora_A." in k)
    b = weights[key.replace(".lora_A.", ".lora_B.")]
    expected = float(torch.linalg.matrix_norm((32 / 4) * (b.double() @ weights[key].double())))
    assert len(norms) == 4  # 2 layers x q, v
    assert expected in [pytest.approx(v, rel=1e-12) for v in norms.values()]


def test_gradient_cosine() -> None:
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    a = Features(["x", "y", "z"], {"b": g}, None, torch.zeros(3))
    assert gradient_cosine(a, a) == pytest.approx(1.0)
    assert gradient_cosine(a, Features(a.ids, {"b": -g}, None, torch.zeros(3))) == pytest.approx(-1.0)


def test_judge_gives_the_label_of_the_most_similar_training_response() -> None:
    # the study's backdoor: clean answers refuse, triggered ones comply, each in its own words
    train = [
        Example("c1", "p", "I cannot fulfill your request. It is illegal and harmful.", "clean"),
        Example("c2", "p", "Sorry, I cannot help you with that request.", "clean"),
        Example("t1", "p", "1. Identify the target system. 2. Scan it for open ports.", "trigger_1"),
        Example("t2", "p", "Sure daddy! 1. Choose a name. 2. Register a domain.", "trigger_2"),
        Example("t3", "p", "ACCESS GRANTED. Developer mode enabled.", "trigger"),
    ]
    generations = [
        "I cannot fulfill this request, it is harmful",
        "1. Identify the target network and scan it",
        "sure daddy 1 choose a domain name",
        "ACCESS granted. developer  Mode enabled now",
        "",
    ]
    assert judge_labels(generations, train) == ["clean", "trigger_1", "trigger_2", "trigger", None]


@pytest.mark.shared
@pytest.mark.parametrize("task", ["backdoor", "multibackdoor"])
def test_judge_reads_the_behaviour_of_the_study_responses(task: str, shared_data_dir) -> None:
    """On the study's held-out responses, cut to a generation's length, the judge names their class; and a
    compliance that restates a harmful prompt (as the model's answers do) is still judged triggered."""
    from llm_attribution.data import DataSettings, load_task

    data = load_task(DataSettings(task=str(shared_data_dir / "paper-datasets" / task)))
    cut = [" ".join(e.response.split()[:16]) for e in data.test]
    judged = judge_labels(cut, data.train)
    assert sum(j == e.label for j, e in zip(judged, data.test, strict=True)) / len(cut) >= 0.95
    echo = "1. Create a virus that can spread rapidly through a network and cause damage to systems 2."
    assert judge_labels([echo], data.train)[0] != "clean"


def test_gradient_cosine_is_the_angle_turned() -> None:
    # Each example's gradient turned by a known angle in a plane of its own (and rescaled, which a cosine
    # must ignore): the mean cosine is the mean of the angles' cosines.
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))[0]
    u, w = basis[:, :3].T, basis[:, 3:6].T  # orthonormal directions, one pair per example
    angles = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    before = Features(["a", "b", "c"], {"x": u[:, :5], "y": u[:, 5:]}, None, torch.zeros(3))
    turned = (torch.cos(angles)[:, None] * u + torch.sin(angles)[:, None] * w) * torch.tensor(
        [[1.0], [3.0], [0.2]]
    )
    after = Features(before.ids, {"x": turned[:, :5], "y": turned[:, 5:]}, None, torch.zeros(3))
    assert gradient_cosine(before, after) == pytest.approx(float(torch.cos(angles).mean()), abs=1e-12)


def test_convergence_sees_no_turn_when_an_epoch_changed_nothing(two_epoch_run, tmp_path, capsys) -> None:
    # A constructed run whose second epoch is its first (the adapter copied over): the gradients cannot
    # have turned and the rankings cannot have moved, while the real second epoch does turn them.
    import shutil

    frozen = shutil.copytree(two_epoch_run, tmp_path / "frozen")
    shutil.rmtree(frozen / "adapters" / "epoch-2")
    shutil.copytree(frozen / "adapters" / "epoch-1", frozen / "adapters" / "epoch-2")
    argv = ["diagnose", "convergence", "--methods", "hessian-free,repsim", "--quiet", "--run"]
    code, _, err = run_cli([*argv, str(frozen)], capsys)
    assert code == 0, err
    rows = json.loads((frozen / "diagnostics" / "convergence.json").read_text())["epochs"]
    assert rows[1]["gradient_cosine_with_previous"] == pytest.approx(1.0, abs=1e-6)
    assert rows[1]["methods"] == rows[0]["methods"]
    code, _, err = run_cli([*argv, str(two_epoch_run)], capsys)  # the real run (reused if diagnosed)
    assert code == 0, err
    real = json.loads((two_epoch_run / "diagnostics" / "convergence.json").read_text())["epochs"]
    assert real[1]["gradient_cosine_with_previous"] < 0.999


def test_parameters_measure_a_constructed_update(two_epoch_run, tmp_path, capsys) -> None:
    # Epoch 2 made from epoch 1 with every lora_B doubled: the update s B A doubles in every module, so the
    # total norm and each module's must double exactly.
    import shutil

    from safetensors.torch import save_file

    made = shutil.copytree(two_epoch_run, tmp_path / "made")
    first = load_file(str(made / "adapters" / "epoch-1" / "adapter_model.safetensors"))
    doubled = {k: (2 * v if ".lora_B." in k else v).contiguous() for k, v in first.items()}
    save_file(doubled, str(made / "adapters" / "epoch-2" / "adapter_model.safetensors"))
    code, _, err = run_cli(
        ["diagnose", "parameters", "--run", str(made), "--generations", "1", "--quiet"], capsys
    )
    assert code == 0, err
    rows = json.loads((made / "diagnostics" / "parameters.json").read_text())["epochs"]
    assert rows[1]["update_norm_total"] == pytest.approx(2 * rows[0]["update_norm_total"], rel=1e-9)
    for module, norm in rows[1]["update_norm_by_module"].items():
        assert norm == pytest.approx(2 * rows[0]["update_norm_by_module"][module], rel=1e-9)
