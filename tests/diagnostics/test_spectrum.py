from __future__ import annotations

import pytest
import torch

from llm_attribution.diagnostics.spectrum import block_spectrum, spectra, summarize_spectra


def _dense_reference(g: torch.Tensor, v: torch.Tensor, damping: float):
    fisher = g.T @ g / g.shape[0]
    eigenvalues, vectors = torch.linalg.eigh(fisher)
    below = eigenvalues < damping
    energy_below = ((v @ vectors[:, below]).square().sum(dim=1) / v.square().sum(dim=1)).mean()
    return eigenvalues, float(below.double().mean()), float(energy_below)


@pytest.mark.parametrize(("n", "d"), [(6, 15), (30, 8)])
def test_gram_route_equals_the_dense_fisher(n: int, d: int) -> None:
    gen = torch.Generator().manual_seed(n * d)
    g = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    v = torch.randn(4, d, generator=gen, dtype=torch.float64)
    s = block_spectrum(g, v, damping_scale=0.1)
    eigenvalues, share_dirs, share_energy = _dense_reference(g, v, s.damping)
    assert s.rank == min(n, d)
    assert s.top_eigenvalue == pytest.approx(float(eigenvalues.max()), rel=1e-10)
    assert s.share_directions_below_damping == pytest.approx(share_dirs, abs=1e-12)
    assert s.share_test_energy_below_damping == pytest.approx(share_energy, abs=1e-9)
    assert 1.0 <= s.effective_rank <= s.rank


def test_rank_one_block_and_summary() -> None:
    g = torch.ones(5, 1) @ torch.randn(1, 7, generator=torch.Generator().manual_seed(0))
    per_block = spectra(
        {"a": g, "zero": torch.zeros(5, 7)}, {"a": torch.randn(2, 7), "zero": torch.randn(2, 7)}
    )
    assert list(per_block) == ["a"]  # all-zero blocks carry no spectrum
    assert per_block["a"].rank == 1 and per_block["a"].effective_rank == pytest.approx(1.0)
    assert summarize_spectra(per_block)["blocks"] == 1


def test_cli_spectrum_on_a_tiny_run(tmp_path, capsys) -> None:
    import json

    from tests.helpers import run_cli

    run = tmp_path / "r"
    argv = [
        "finetune",
        "--task",
        "grammars",
        "--model",
        "tiny",
        "--epochs",
        "1",
        "--train-limit",
        "30",
        "--test-limit",
        "5",
        "--quiet",
        "--out",
        str(run),
    ]
    assert run_cli(argv, capsys)[0] == 0
    code, out, err = run_cli(["diagnose", "spectrum", "--run", str(run), "--quiet"], capsys)
    assert code == 0, err
    record = json.loads((run / "diagnostics" / "spectrum.json").read_text())
    assert record["summary"]["blocks"] == 8
    assert all(0.0 <= b["share_test_energy_below_damping"] <= 1.0 for b in record["blocks"].values())
    assert "median over blocks" in out
