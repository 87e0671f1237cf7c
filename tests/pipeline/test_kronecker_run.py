"""Token-level K-FAC and EK-FAC through a run: the Kronecker factors are gathered in the pass that collects
the training gradients, kept beside them, reused, and a separate pass over stored features gives the
same factors and scores."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load_file, save_file

from llm_attribution.evaluation.score_files import read_scores
from llm_attribution.features.kronecker import KroneckerFactors
from llm_attribution.features.store import KRONECKER
from tests.helpers import run_cli, tiny_run_args

ARGS = tiny_run_args(train=24, test=4, epochs=1)


def _factors(run) -> tuple[KroneckerFactors, dict]:
    [path] = (run / "features").glob(f"train-*/{KRONECKER}")
    manifest = json.loads((path.parent / "manifest.json").read_text())
    return KroneckerFactors.from_tensors(load_file(path)), manifest


def test_factors_from_the_gradient_pass_equal_a_separate_pass(tmp_path, capsys) -> None:
    same = tmp_path / "same"
    code, _, err = run_cli(["run", *ARGS, "--methods", "kfac,ekfac", "--out", str(same)], capsys)
    assert code == 0, err
    factors, manifest = _factors(same)
    assert manifest["kronecker"]["examples"] == factors.examples == 24
    assert not list((same / "features").glob(f"test-*/{KRONECKER}"))  # only training factors are needed

    later = tmp_path / "later"  # features stored first without factors: a second pass gathers them
    code, _, err = run_cli(["run", *ARGS, "--methods", "hessian-free", "--out", str(later)], capsys)
    assert code == 0, err
    assert not list((later / "features").glob(f"train-*/{KRONECKER}"))
    code, _, err = run_cli(["attribute", "--run", str(later), "--methods", "kfac,ekfac", "--quiet"], capsys)
    assert code == 0, err
    again, _ = _factors(later)
    assert (again.tokens, again.examples) == (factors.tokens, factors.examples)
    for name in factors.inputs:
        for got, want in (
            (again.inputs[name], factors.inputs[name]),
            (again.outputs[name], factors.outputs[name]),
        ):
            assert float((got - want).norm() / want.norm()) < 1e-5
    for method in ("kfac", "ekfac"):
        one = read_scores(same / "scores" / f"{method}.safetensors")
        two = read_scores(later / "scores" / f"{method}.safetensors")
        assert float((one - two).norm() / two.norm()) < 1e-4, method


def test_a_corrupted_factor_file_is_named(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(["run", *ARGS, "--methods", "kfac", "--out", str(run)], capsys)
    assert code == 0, err
    [path] = (run / "features").glob(f"train-*/{KRONECKER}")
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    (run / "scores" / "kfac.safetensors").unlink()
    code, _, err = run_cli(["attribute", "--run", str(run), "--methods", "kfac", "--quiet"], capsys)
    assert code == 2 and KRONECKER in err and "corrupted" in err


def test_factors_of_the_earlier_token_set_are_gathered_again(tmp_path, capsys) -> None:
    """A run whose stored factors averaged A over every non-padding token (before per-block counts):
    attribute gathers them again over the gradient-carrying tokens, keeps the stored gradients, and scores
    as a fresh run does."""
    run = tmp_path / "run"
    code, _, err = run_cli(["run", *ARGS, "--methods", "kfac", "--out", str(run)], capsys)
    assert code == 0, err
    current, _ = _factors(run)
    [path] = (run / "features").glob(f"train-*/{KRONECKER}")
    old = {f"inputs/{k}": v for k, v in current.inputs.items()}
    old.update({f"outputs/{k}": v for k, v in current.outputs.items()})
    old["__counts__"] = torch.tensor([10**6, current.examples], dtype=torch.int64)
    save_file(old, path)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["kronecker"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    shards = sorted(p.stat().st_mtime_ns for p in path.parent.glob("*.safetensors") if p != path)
    fresh = read_scores(run / "scores" / "kfac.safetensors")
    (run / "scores" / "kfac.safetensors").unlink()
    code, _, err = run_cli(["attribute", "--run", str(run), "--methods", "kfac", "--quiet"], capsys)
    assert code == 0, err
    again, _ = _factors(run)
    assert again.tokens == current.tokens
    assert sorted(p.stat().st_mtime_ns for p in path.parent.glob("*.safetensors") if p != path) == shards
    rescored = read_scores(run / "scores" / "kfac.safetensors")
    assert float((rescored - fresh).norm() / fresh.norm()) < 1e-4
