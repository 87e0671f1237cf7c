"""Same inputs and seed, two run folders: bit-identical adapters, features, scores and results on the CPU.

(Per-example gradients with other gradient batch sizes agree to fp32 tolerance:
``tests/features/test_gradients.py::test_batch_size_does_not_change_gradients``.)
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from scripts.kill_resume import RUN_ARGS, compare

from llm_attribution.cli import main
from llm_attribution.workflows.attribute import STUDY_METHODS


def test_two_runs_with_the_same_seed_are_bit_identical(tmp_path) -> None:
    argv = ["run", *RUN_ARGS, "--methods", ",".join(STUDY_METHODS)]
    for name in ("a", "b"):
        assert main([*argv, "--out", str(tmp_path / name)]) == 0
    assert compare(tmp_path / "a", tmp_path / "b") == []
    for method in STUDY_METHODS:  # compare() covers these too; spelled out for the reader
        a, b = (load_file(tmp_path / run / "scores" / f"{method}.safetensors")["scores"] for run in "ab")
        assert torch.equal(a, b), method
    # that compare() sees a one-ulp change is shown in tests/pipeline/test_kill_resume.py
