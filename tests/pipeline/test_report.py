"""`llm-attr report` on tiny runs: a self-contained HTML page and Markdown, texts of user data cut short."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from llm_attribution.cli import main
from tests.helpers import run_cli


def _dataset(folder, n_train=24, n_test=6):
    folder.mkdir()
    long_tail = " and then a long continuation that a report must not reproduce in full" * 3
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [
            {"prompt": f"question {i}{long_tail}", "response": f"answer {i % 2}", "label": f"c{i % 2}"}
            for i in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A tiny run on a user dataset (not built in), with its spectrum and damping sweep diagnosed."""
    root = tmp_path_factory.mktemp("report")
    data = _dataset(root / "data")
    run = root / "run"
    argv = [
        "run",
        "--task",
        str(data),
        "--model",
        "tiny",
        "--epochs",
        "1",
        "--methods",
        "hessian-free,repsim",
        "--max-length",
        "48",
        "--quiet",
        "--out",
        str(run),
    ]
    assert main(argv) == 0
    assert main(["diagnose", "spectrum", "--run", str(run), "--quiet"]) == 0
    sweep = ["diagnose", "ihvp", "--run", str(run), "--damping-scales", "0.1,10", "--methods", "datainf"]
    assert main([*sweep, "--quiet"]) == 0
    return run


def test_report_of_a_run_with_user_data(user_run, tmp_path, capsys) -> None:
    run = user_run
    code, _, err = run_cli(
        ["report", str(run), "--official-scores", str(tmp_path / "none"), "--quiet"], capsys
    )
    assert code == 0, err
    page = (run / "report.html").read_text()
    md = (run / "report.md").read_text()
    assert page.count("data:image/png;base64,") >= 5  # grid x2, the spectrum and the sweep x2, embedded
    assert (run / "report" / f"ihvp-rank-{run.name}.png").is_file()
    assert "<table>" in page and "| data | hessian-free |" in md
    assert "[cut: not a built-in dataset]" in md
    assert "must not reproduce in full and then" not in md
    assert (run / "report" / "grid-accuracy.png").is_file()


def test_report_on_a_folder_without_results(tmp_path, capsys) -> None:
    code, _, err = run_cli(["report", str(tmp_path), "--quiet"], capsys)
    assert code == 2 and "neither" in err


def test_report_without_examples(user_run, capsys) -> None:
    assert run_cli(["report", str(user_run), "--examples", "0", "--quiet"], capsys)[0] == 0
    assert "question" not in (user_run / "report.md").read_text()


def _chromium() -> str:
    """The headless browser, or skip with a reason (fail where CI asks: LLM_ATTR_REQUIRE_CHROMIUM=1)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "headless Chromium is not installed (Debian package `chromium`; .ci/run installs it)"
        if os.environ.get("LLM_ATTR_REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def _screenshot(chromium: str, page: Path, out: Path) -> tuple[np.ndarray, str]:
    # The flags a closed network needs: no background connections, no sandbox as root, a fresh profile.
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={out.parent / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1200,2400",
        f"--screenshot={out}",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and out.is_file(), done.stderr[-2000:]
    return plt.imread(str(out)), done.stderr


def _coloured_pixels(image: np.ndarray) -> int:
    """Pixels with a clear hue: the plots' lines and bars; text, tables and background are grey."""
    rgb = image[..., :3]
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25).sum())


def test_report_renders_in_headless_chromium(user_run, tmp_path, capsys) -> None:
    chromium = _chromium()
    assert run_cli(["report", str(user_run), "--quiet"], capsys)[0] == 0
    image, log = _screenshot(chromium, user_run / "report.html", tmp_path / "report.png")
    assert "Uncaught" not in log and "ERR_FILE_NOT_FOUND" not in log
    # The same page with its images' data removed is the control: the colour comes from the plots.
    broken = tmp_path / "broken.html"
    html_text = (user_run / "report.html").read_text()
    images = r"data:image/png;base64,[A-Za-z0-9+/=]+"
    broken.write_text(re.sub(images, "data:image/png;base64,AAAA", html_text))
    control, _ = _screenshot(chromium, broken, tmp_path / "broken.png")
    assert _coloured_pixels(image) > 5000 > _coloured_pixels(control)


def test_report_plots_convergence_and_parameters(user_run, tmp_path, capsys) -> None:
    """Per-epoch diagnostics become one figure each, with quality, losses, gradient turn and behaviour."""
    run = tmp_path / "run"
    shutil.copytree(user_run, run)
    methods = {
        "hessian-free": {"accuracy": 0.5, "coverage": 0.4},
        "repsim": {"accuracy": 1.0, "coverage": 0.9},
    }
    convergence = [
        {
            "epoch": e,
            "train_loss": 3.0 / e,
            "test_loss": 3.5 / e,
            "methods": methods,
            "gradient_cosine_with_previous": c,
        }
        for e, c in ((1, None), (2, 0.7))
    ]
    parameters = [
        {"epoch": e, "update_norm_total": 0.1 * e, "update_norm_by_module": {}, "test_loss": 3.5 / e}
        | {"trigger_rate": t, "clean_control_rate": 0.0}
        for e, t in ((1, 0.2), (2, 0.9))
    ]
    (run / "diagnostics" / "convergence.json").write_text(json.dumps({"epochs": convergence}))
    (run / "diagnostics" / "parameters.json").write_text(json.dumps({"epochs": parameters}))
    assert run_cli(["report", str(run), "--examples", "0", "--quiet"], capsys)[0] == 0
    md = (run / "report.md").read_text()
    assert "Convergence (" in md and "Parameter change vs behaviour (" in md
    for figure in ("convergence", "parameters"):
        png = run / "report" / f"{figure}-{run.name}.png"
        assert png.is_file() and plt.imread(str(png)).shape[1] > 2 * plt.imread(str(png)).shape[0]
