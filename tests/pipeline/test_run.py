"""`llm-attr run` / `attribute` / `evaluate` end to end on the tiny model, and the feature store's reuse."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from llm_attribution.cli import main
from llm_attribution.evaluation.grid import noted_name
from llm_attribution.features import store as store_module
from tests.helpers import run_cli, tiny_run_args

METHODS = "hessian-free,datainf,lissa,exact,repsim"
TINY_RUN = tiny_run_args()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    start = time.perf_counter()
    code = main(["run", *TINY_RUN, "--methods", METHODS, "--out", str(run)])
    return run, code, time.perf_counter() - start


def test_run_scores_all_five_methods_quickly(tiny_run) -> None:
    run, code, seconds = tiny_run
    assert code == 0
    assert seconds < 60
    results = json.loads((run / "results.json").read_text())
    assert list(results["methods"]) == METHODS.split(",")
    for row in results["methods"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["coverage"] <= 1.0
        scores = load_file(str(run / row["scores"]))["scores"]
        assert scores.shape == (10, 60) and torch.isfinite(scores).all()
    assert results["n_train"] == 60 and results["n_test"] == 10 and results["epoch"] == 2
    # Above chance with a margin, by the interval: 10 rules, 6 training examples each, so a random
    # ranking's top-1 has the test's rule with probability 0.10; exact's and LiSSA's 95% intervals start
    # above it (exact's by more than 0.2), although the tiny model is small and its test set 10 examples.
    chance = 1 / results["n_classes"]  # the built-in rules are balanced
    assert results["methods"]["exact"]["intervals"]["accuracy"][0] > chance + 0.2
    assert results["methods"]["lissa"]["intervals"]["accuracy"][0] > chance
    assert "higher" in results["convention"]
    assert results["versions"]["torch"].startswith("2.")


def test_lissa_converges_to_exact_on_real_lora_gradients_given_depth(tiny_run, tmp_path, capsys) -> None:
    run = _copy(tiny_run, tmp_path)
    exact = load_file(str(run / "scores" / "exact.safetensors"))["scores"]
    short = load_file(str(run / "scores" / "lissa.safetensors"))["scores"]
    # The default depth is too short on LoRA blocks (singular Fisher), and the record says so.
    notes = json.loads((run / "results.json").read_text())["methods"]["lissa"]["notes"]
    assert notes["depth"] == 100 and not notes["converged"] and notes["blocks_not_converged"] > 0
    argv = ["attribute", "--run", str(run), "--methods", "lissa", "--method-options", "lissa.depth=12000"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    deep = load_file(str(run / "scores" / "lissa.safetensors"))["scores"]
    assert float((deep - exact).norm() / exact.norm()) < 1e-2
    assert float((short - exact).norm() / exact.norm()) > 1e-2  # the short one is further off
    # The bound behind the notes is the slowest direction of all, the Fisher's null space, which no
    # training gradient touches: it can still flag blocks whose scores are already within 1% of exact.
    deeper = json.loads((run / "results.json").read_text())["methods"]["lissa"]["notes"]
    assert deeper["depth"] == 12000 and deeper["blocks_not_converged"] < notes["blocks_not_converged"]
    assert f"lissa: {noted_name('lissa', deeper)}" in out and "depth 12000" in out


def _copy(tiny_run, tmp_path):
    """A private copy of the shared run, for tests that change it."""
    import shutil

    return shutil.copytree(tiny_run[0], tmp_path / "copy")


def test_attribute_rescores_from_stored_features(tiny_run, tmp_path, capsys, monkeypatch) -> None:
    run = _copy(tiny_run, tmp_path)
    calls = []
    for name in ("compute", "ensure"):  # test features are computed in memory, training ones streamed
        original = getattr(store_module.FeatureStore, name)

        def counting(self, examples, collect, original=original):
            return original(self, examples, lambda chunk: calls.append(len(chunk)) or collect(chunk))

        monkeypatch.setattr(store_module.FeatureStore, name, counting)
    code, out, err = run_cli(["attribute", "--run", str(run), "--methods", "hessian-free", "--quiet"], capsys)
    assert code == 0, err
    assert calls == []  # nothing recomputed
    assert "hessian-free" in out
    # another epoch's adapter: other weights, so its features are computed afresh
    code, _, err = run_cli(
        ["attribute", "--run", str(run), "--methods", "hessian-free", "--epoch", "1", "--quiet"], capsys
    )
    assert code == 0, err
    assert sum(calls) == 70


def test_corrupted_shard_is_named(tiny_run, capsys, tmp_path) -> None:
    run = _copy(tiny_run, tmp_path)
    results = json.loads((run / "results.json").read_text())
    shards = sorted((run / "features").glob("train-*/shard-*.safetensors"))
    for shard in shards:  # every stored train shard, whichever epoch's
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    code, _, err = run_cli(
        [
            "attribute",
            "--run",
            str(run),
            "--methods",
            "hessian-free",
            "--method-options",
            "hessian-free.chunk_size=7",  # not scored yet, so the features must be read
            "--epoch",
            str(results["epoch"]),
            "--quiet",
        ],
        capsys,
    )
    assert code == 2
    assert shards[0].name in err and "corrupted" in err and len(err.strip().splitlines()) == 1


def test_run_with_a_given_adapter(tiny_run, tmp_path, capsys) -> None:
    adapter = tiny_run[0] / "adapters" / "epoch-2"
    out = tmp_path / "given"
    code, _, err = run_cli(
        ["run", *TINY_RUN, "--methods", "hessian-free,repsim", "--adapter", str(adapter), "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    given = json.loads((out / "results.json").read_text())
    trained = json.loads((tiny_run[0] / "results.json").read_text())
    assert given["adapter_sha256"] == trained["adapter_sha256"]
    a = load_file(str(out / "scores" / "hessian-free.safetensors"))["scores"]
    b = load_file(str(tiny_run[0] / "scores" / "hessian-free.safetensors"))["scores"]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # same model, same data: same scores


def test_evaluate_reads_a_runs_scores(tiny_run, capsys, tmp_path) -> None:
    run = tiny_run[0]
    # the run used grammars subsampled to 60/10: write those examples as a dataset folder to evaluate against
    from llm_attribution.data import DataSettings, load_task

    task = load_task(DataSettings(task="grammars", train_limit=60, test_limit=10))
    folder = tmp_path / "data"
    folder.mkdir()
    for split, examples in (("train", task.train), ("test", task.test)):
        rows = [{"id": e.id, "prompt": e.prompt, "response": e.response, "label": e.label} for e in examples]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(
        [
            "evaluate",
            "--scores",
            str(run / "scores" / "exact.safetensors"),
            "--data",
            str(folder),
            "--json",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    recorded = json.loads((run / "results.json").read_text())["methods"]["exact"]
    assert json.loads(out)["accuracy"] == pytest.approx(recorded["accuracy"])
    assert json.loads(out)["coverage"] == pytest.approx(recorded["coverage"])
    # a matrix of the wrong shape is one clear line
    bad = tmp_path / "bad.npy"
    import numpy as np

    np.save(bad, np.zeros((3, 4)))
    code, _, err = run_cli(["evaluate", "--scores", str(bad), "--data", str(folder), "--quiet"], capsys)
    assert code == 2 and "shape" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--methods", "nope"], "unknown attribution method"),
        (["--methods", "lissa", "--method-options", "lissa.nope=1"], "no option"),
        (["--methods", "lissa", "--method-options", "lissa.depth=abc"], "int"),
        (["--methods", "lissa", "--method-options", "datainf.damping_scale=1"], "not among"),
    ],
)
def test_bad_attribution_options(argv, needle, tmp_path, capsys) -> None:
    code, _, err = run_cli(["run", *TINY_RUN, *argv, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_attribute_on_a_folder_that_is_not_a_run(tmp_path, capsys) -> None:
    code, _, err = run_cli(["attribute", "--run", str(tmp_path), "--quiet"], capsys)
    assert code == 2 and "not a run" in err


def test_run_epoch_option_matches_attribute_on_that_epoch(tiny_run, tmp_path, capsys) -> None:
    """`run --epoch 1` swaps adapter weights in place; `attribute --epoch 1` reloads them: same scores."""
    run = _copy(tiny_run, tmp_path)
    code, _, err = run_cli(
        ["run", *TINY_RUN, "--methods", "hessian-free", "--epoch", "1", "--out", str(run)], capsys
    )
    assert code == 0, err
    in_place = load_file(str(run / "scores" / "hessian-free.safetensors"))["scores"]
    assert json.loads((run / "results.json").read_text())["epoch"] == 1
    code, _, err = run_cli(
        ["attribute", "--run", str(run), "--methods", "hessian-free", "--epoch", "1", "--quiet"], capsys
    )
    assert code == 0, err
    reloaded = load_file(str(run / "scores" / "hessian-free.safetensors"))["scores"]
    assert torch.equal(in_place, reloaded)
    last = load_file(str(tiny_run[0] / "scores" / "hessian-free.safetensors"))["scores"]
    assert not torch.allclose(in_place, last)
