"""Token-level K-FAC and EK-FAC through a run: the Kronecker factors are gathered in the pass that collects
the training gradients, kept beside them, reused, and a separate pass over stored features gives the
same factors and scores."""

from __future__ import annotations

import json

from safetensors.torch import load_file

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
