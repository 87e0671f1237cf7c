"""The contract between ``benchmarks/peers.py`` and the peer runners, on the tiny model, no peer installed:
the export writes what runners read, the runners' loss is the contract's, and the harness judges and
measures as it says."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from llm_attribution.cli import main
from tests.helpers import tiny_run_args

ROOT = Path(__file__).resolve().parents[2]


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sys.path.insert(0, str(ROOT / "benchmarks"))  # the harness imports its sibling ``sections`` as a script does
peers = load("peers_harness", ROOT / "benchmarks" / "peers.py")
common = load("common", ROOT / "benchmarks" / "peers" / "common.py")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    work = tmp_path_factory.mktemp("peers")
    run = work / "run"
    args = tiny_run_args(train=12, test=4, epochs=1)
    assert main(["run", *args, "--max-length", "32", "--methods", "hessian-free", "--out", str(run)]) == 0
    meta = peers.export(run, work / "inputs")
    return run, work / "inputs", meta


def test_export_writes_the_contract(exported: tuple[Path, Path, dict]) -> None:
    run, inputs, meta = exported
    assert (inputs / "model" / "config.json").is_file() and (
        inputs / "adapter" / "adapter_config.json"
    ).is_file()
    adapter_config = json.loads((inputs / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((inputs / "model").resolve())
    data = json.loads((run / "data.json").read_text())
    for split, n in (("train", 12), ("test", 4)):
        rows = torch.load(inputs / f"{split}.pt", weights_only=False)
        assert rows["ids"] == data[f"{split}_ids"] and len(rows["classes"]) == n
        for key in ("input_ids", "attention_mask", "labels"):
            assert rows[key].dtype == torch.long and rows[key].shape == rows["input_ids"].shape
        assert (rows["labels"][rows["attention_mask"] == 0] == -100).all()
    assert (meta["n_train"], meta["n_test"]) == (12, 4)
    assert meta["export_check"]["max_abs_diff"] == 0.0
    assert json.loads((inputs / "meta.json").read_text()) == meta
    assert peers.export(run, inputs) == meta  # reused, not rewritten


def test_runner_loss_is_the_contract_loss(exported: tuple[Path, Path, dict]) -> None:
    _, inputs, _ = exported
    model = common.load_model(inputs)
    train = common.load_split(inputs, "train")
    rows = {key: train[key][:3] for key in common.KEYS}
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        batched = common.per_example_loss(logits, rows["labels"])
        one_by_one = [float(model(**{k: v[i : i + 1] for k, v in rows.items()}).loss) for i in range(3)]
    assert torch.allclose(batched, torch.tensor(one_by_one), rtol=1e-5)
    assert all(name for name in common.lora_linear_names(model))
    assert common.gradient_dot(model, train, common.load_split(inputs, "test")) != 0.0


def test_judge_reads_higher_as_more_supportive() -> None:
    train_labels, test_labels = ["a", "a", "b", "b"], ["a", "b"]
    right = np.array([[1.0, 0.5, 0.0, 0.1], [0.0, 0.2, 0.9, 1.0]])
    ours = {"exact": right}
    verdict = peers.judge(right, (train_labels, test_labels), ours, "LiSSA")  # compared with exact
    assert verdict["accuracy"] == 1.0 and verdict["coverage"] == 1.0 and verdict["agreement"] == 1.0
    verdict = peers.judge(-right, (train_labels, test_labels), ours, "LiSSA")
    assert verdict["accuracy"] == 0.0 and verdict["agreement"] == -1.0
    assert peers.closest_method("TracIn (gradient dot)") == "hessian-free"
    assert peers.closest_method("DataInf") == "datainf"
    # the peers' EK-FAC is token-level: ours of the same kind; Bergson's TrackStar beside ours
    assert peers.closest_method("EK-FAC influence") == "ekfac"
    assert peers.closest_method("EKFACAttributor (damping 0.1)") == "ekfac"
    assert peers.closest_method("trackstar pipeline (projection 16)") == "trackstar"


def test_runner_constants_are_read_without_importing_the_runner() -> None:
    kronfluence = peers.Peer.read("kronfluence")
    assert kronfluence.methods == ("ekfac", "identity") and kronfluence.version == "1.0.1"
    assert kronfluence.plan()[0][0] == "torch==2.13.0" and kronfluence.plan()[-1] == [
        "--no-deps",
        "kronfluence==1.0.1",
    ]
    assert peers.Peer.read("dattri").methods == ("datainf",)


def test_measure_reports_exit_peak_memory_and_timeouts(tmp_path: Path) -> None:
    env = peers.child_env(tmp_path)
    grow = [sys.executable, "-c", "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"]
    done = peers.measure(grow, tmp_path / "grow.log", env, timeout=60)
    assert done.returncode == 0 and done.peak_mib > 300 and not done.timed_out
    done = peers.measure(
        [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "s.log", env, timeout=0.5
    )
    assert done.timed_out and done.returncode != 0 and done.seconds < 10
    done = peers.measure(
        [sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], tmp_path / "k.log", env, 60
    )
    assert done.returncode == -9 and peers.killed_or_exit(done).startswith("killed by SIGKILL")


def test_run_main_writes_the_reason_of_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({"n_train": 3, "n_test": 2}))
    argv = ["run_x.py", "--inputs", str(tmp_path), "--out", str(tmp_path / "out")]

    def fails(inputs: Path, method: str, stages: object) -> object:
        raise ImportError("no module named peer")

    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        common.run_main("test", ("m",), fails)
    assert exit_info.value.code == 1
    assert (tmp_path / "out" / "error.txt").read_text().splitlines()[0] == "ImportError: no module named peer"

    def works(inputs: Path, method: str, stages: object) -> object:
        return common.Output(np.ones((2, 3)), {"peer": "x", "method": method})

    common.run_main("test", ("m",), works)
    assert np.load(tmp_path / "out" / "scores.npy").shape == (2, 3)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["method"] == "m"
    assert not (tmp_path / "out" / "error.txt").exists()
