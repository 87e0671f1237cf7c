"""``torchrun --nproc-per-node 2`` (gloo, tiny model) gives the single process's adapters and scores.

Tolerances: the two runs do the same arithmetic in a different order. Each rank sums its slice's
gradient contributions and the two partial sums are then added; features of a slice are computed in
other batches; scoring runs on slices of the test rows. Float32 rounding (eps 1.2e-7) in a different
order gives differences of a few ulps, which two epochs of AdamW carry into the weights (7e-9 seen, on
weights of size ~0.1) and scoring into the scores (relative Frobenius error below 1e-6 seen). The bounds
below leave room for other CPUs and BLAS builds, and stay far below what a real mistake gives: a
dropout mask drawn per rank (tried: 1.5e-3), a gradient averaged per rank or a missing all-reduce moves
the adapters by 1e-3 or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llm_attribution.cli import main
from tests.helpers import tiny_run_args

METHODS = (
    "hessian-free",
    "grad-cosine",
    "datainf",
    "lissa",
    "exact",
    "eshampoo",
    "kfac",
    "ekfac",
    "astra",
    "tracin",
    "less",
    "trackstar",
    "repsim",
    "rept",
    "knn-shapley",
    "bm25",
    "magic",
)
# 25 examples in batches of 8: the last batch of each epoch has 1 row, so rank 1 has an empty share
# (it must still draw the dropout masks); the gradient shards split 13 + 12, the 5 test rows 3 + 2.
RUN = [*tiny_run_args(train=25, test=5, epochs=2), "--methods", ",".join(METHODS)]
WEIGHT_ATOL = 1e-6
SCORE_RTOL = 1e-5


def torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 -m llm_attribution ARGS`` (a free port, gloo on CPU)."""
    env = {**os.environ, "LLM_ATTR_QUIET": "1", "OMP_NUM_THREADS": "1", "LLM_ATTR_DIST_TIMEOUT": "120"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*command, "-m", "llm_attribution", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    assert main(["run", *RUN, "--out", str(folder / "one")]) == 0
    two = torchrun(["run", *RUN, "--out", str(folder / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    return folder / "one", folder / "two", two


def test_two_processes_train_the_same_adapters(runs) -> None:
    one, two, _ = runs
    assert json.loads((two / "finetune.json").read_text())["processes"] == 2
    for epoch in (1, 2):
        a = load_file(one / "adapters" / f"epoch-{epoch}" / "adapter_model.safetensors")
        b = load_file(two / "adapters" / f"epoch-{epoch}" / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=0, atol=WEIGHT_ATOL), name
    loss_one = json.loads((one / "finetune.json").read_text())["loss"]["step_loss"]
    loss_two = json.loads((two / "finetune.json").read_text())["loss"]["step_loss"]
    assert loss_two == pytest.approx(loss_one, rel=1e-5)


def test_two_processes_give_the_same_scores(runs) -> None:
    one, two, _ = runs
    for method in METHODS:
        a = load_file(one / "scores" / f"{method}.safetensors")["scores"]
        b = load_file(two / "scores" / f"{method}.safetensors")["scores"]
        assert a.shape == b.shape == (5, 25)
        assert float((a - b).norm() / a.norm()) < SCORE_RTOL, method
        # tie-proof ranking check: the 2-process top example scores the maximum in the 1-process matrix
        top = b.argmax(dim=1)
        assert torch.allclose(a.gather(1, top[:, None]).squeeze(1), a.max(dim=1).values, rtol=SCORE_RTOL)


def test_only_rank_zero_prints_and_writes(runs) -> None:
    _, two, result = runs
    assert result.stdout.count("results: ") == 1
    assert result.stdout.count("method          accuracy") == 1
    leftovers = [p.name for p in two.rglob("*.tmp")]
    assert leftovers == []


def test_an_error_under_torchrun_is_one_line_from_rank_zero(tmp_path) -> None:
    result = torchrun(["run", *RUN, "--task", "no-such-task", "--out", str(tmp_path / "bad")], timeout=120)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("llm-attr")]
    assert ours == [ours[0]] and "llm-attr run: error: unknown task 'no-such-task'" in ours[0]
    assert "exitcode  : 2" in result.stderr  # torchrun's summary: the ranks exited with status 2
    assert not (tmp_path / "bad").exists()


def test_commands_that_run_in_one_process_refuse_torchrun(tmp_path) -> None:
    # "--" keeps torchrun's own parser from reading --run as an abbreviation of its --run-path
    result = torchrun(["--", "explain", "--run", str(tmp_path), "--prompt", "hi"], timeout=120)
    ours = [line for line in result.stderr.splitlines() if line.startswith("llm-attr")]
    assert len(ours) == 1 and "llm-attr explain runs in one process; start it without torchrun" in ours[0]
