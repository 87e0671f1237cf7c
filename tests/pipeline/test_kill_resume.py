"""`llm-attr run` killed with SIGKILL during fine-tuning, gradient collection and scoring, then started again,
ends bit for bit where an uninterrupted run ends. The engine is ``scripts/kill_resume.py`` (a person runs the
same check with ``python scripts/kill_resume.py``)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from scripts.kill_resume import MOMENTS, check_moments, compare


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("kill-resume")
    return work, check_moments(work)


@pytest.mark.parametrize("index", range(len(MOMENTS)))
def test_killed_run_resumes_to_the_uninterrupted_result(outcomes, index: int) -> None:
    _, results = outcomes
    outcome = results[index]
    assert MOMENTS[index].stage in outcome.name
    assert outcome.identical, outcome.differences


def test_the_comparison_sees_a_one_ulp_change(outcomes, tmp_path) -> None:
    """The check can fail: nudging one score of a copy by one ulp is reported."""
    work, _ = outcomes
    copy = shutil.copytree(work / "uninterrupted", tmp_path / "copy")
    assert compare(work / "uninterrupted", copy) == []
    path = copy / "scores" / "exact.safetensors"
    scores = load_file(path)["scores"]
    scores[0, 0] = torch.nextafter(scores[0, 0], torch.tensor(float("inf")))
    save_file({"scores": scores}, path)
    assert compare(work / "uninterrupted", copy) == ["scores/exact.safetensors differs"]
