"""A new method is one file: dropped into ``attribution/methods/``, it is found by discovery and runs in
``run`` (in memory and ``--stream``), ``explain`` and ``study`` on the tiny model, with no other file
touched. Its scores are checked against the same algebra done by hand on the run's stored features."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llm_attribution.attribution.methods as methods_package
from llm_attribution.attribution import registry
from llm_attribution.workflows.layout import features_dir
from tests.helpers import run_cli, tiny_run_args

NAME = "unit-gradient"
MODULE = f"toy_method_{os.getpid()}"
# The whole method: the test gradient of each block scaled to unit length (so every block counts alike),
# dotted with the training gradients. Nothing else in the package knows of it.
SOURCE = '''
"""A toy method for the test of discovery: per-block unit test gradients dotted with training gradients."""

import torch

from ..base import InnerProductMethod, live_blocks
from ..registry import register


@register
class UnitGradient(InnerProductMethod):
    """Score = sum over blocks of (g_test / ||g_test||) . g_train; HIGHER = more supportive."""

    name = "unit-gradient"

    def transform_test(self, train, test):
        names, dtype = live_blocks(train, test)
        return {
            name: torch.nn.functional.normalize(test[name].to(dtype), dim=1) for name in names
        }
'''


@pytest.fixture
def toy_method():  # type: ignore[no-untyped-def]
    path = Path(methods_package.__path__[0]) / f"{MODULE}.py"
    path.write_text(SOURCE)
    saved = dict(registry._REGISTRY)
    registry._discovered = False  # the next lookup discovers again, and finds the new file
    try:
        yield path
    finally:
        path.unlink()
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
        sys.modules.pop(f"{registry.METHODS_PACKAGE}.{MODULE}", None)


def by_hand(run: Path) -> torch.Tensor:
    """The toy method's algebra on the run's stored gradients, block by block in float64."""
    folders = {split: next(features_dir(run).glob(f"{split}-*")) for split in ("train", "test")}
    blocks = {}
    for split, folder in folders.items():
        shards = sorted(folder.glob("shard-*.safetensors"))
        parts = [load_file(str(shard)) for shard in shards]
        blocks[split] = {
            name: torch.cat([p[name] for p in parts]).double()
            for name in parts[0]
            if not name.startswith("__")
        }
    total = 0
    for name, train in blocks["train"].items():
        if train.abs().sum() > 0:
            total = total + torch.nn.functional.normalize(blocks["test"][name], dim=1) @ train.T
    assert isinstance(total, torch.Tensor)
    return total


def test_a_method_in_one_new_file_runs_everywhere(toy_method, tmp_path, capsys) -> None:
    assert NAME in registry.available_methods()
    methods = ["--methods", f"hessian-free,{NAME}"]
    run = tmp_path / "run"
    code, out, err = run_cli(
        ["run", *tiny_run_args(train=24, test=6, epochs=1), *methods, "--out", str(run)], capsys
    )
    assert code == 0, err
    assert NAME in out
    record = json.loads((run / "results.json").read_text())["methods"][NAME]
    scores = load_file(str(run / record["scores"]))["scores"].double()
    expected = by_hand(run)
    assert float((scores - expected).norm() / expected.norm()) < 1e-5
    # Not Hessian-free under another name: the per-block normalisation changes the scores.
    hessian_free = load_file(str(run / "scores" / "hessian-free.safetensors"))["scores"].double()
    assert float(torch.corrcoef(torch.stack([scores.flatten(), hessian_free.flatten()]))[0, 1]) < 0.9999

    streamed = tmp_path / "streamed"
    code, _, err = run_cli(
        [
            "run",
            *tiny_run_args(train=24, test=6, epochs=1),
            *methods,
            "--stream",
            "true",
            "--out",
            str(streamed),
        ],
        capsys,
    )
    assert code == 0, err
    got = load_file(str(streamed / "scores" / f"{NAME}.safetensors"))["scores"].double()
    assert float((got - scores).norm() / scores.norm()) < 1e-5

    code, out, err = run_cli(
        [
            "explain",
            "--run",
            str(run),
            "--prompt",
            "say apple 1",
            "--response",
            "class c1",
            "--methods",
            NAME,
            "--top",
            "3",
            "--json",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert len(json.loads(out)["methods"][NAME]) == 3

    study = tmp_path / "study"
    code, out, err = run_cli(
        [
            "study",
            "--tasks",
            "grammars",
            "--seeds",
            "0",
            "--model",
            "tiny",
            "--train-limit",
            "20",
            "--test-limit",
            "4",
            "--epochs",
            "1",
            *methods,
            "--quiet",
            "--out",
            str(study),
        ],
        capsys,
    )
    assert code == 0, err
    assert f"| grammars | {NAME} |" in out
    assert NAME in json.loads((study / "study.json").read_text())["tasks"]["grammars"]


def test_the_toy_method_is_gone_with_its_file() -> None:
    """Discovery reads the folder: without the file there is no such method."""
    assert NAME not in registry.available_methods()
    assert not list(Path(methods_package.__path__[0]).glob("toy_method_*.py"))
