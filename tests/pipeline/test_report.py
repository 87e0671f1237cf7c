"""`llm-attr report` on tiny runs: a self-contained HTML page and Markdown, texts of user data cut short;
the page's explorer holds each method's stored top-k and renders a selection in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from llm_attribution.cli import main
from llm_attribution.scoring.store import ScoreStore
from llm_attribution.workflows import trace as trace_module
from llm_attribution.workflows.report.explorer import explorer_data
from llm_attribution.workflows.trace import TraceSettings, trace
from tests.helpers import run_cli

TOP = 10  # the explorer's embedded top-k


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


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
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
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _screenshot(chromium: str, page: Path, out: Path, fragment: str = "") -> tuple[np.ndarray, str]:
    args = ("--hide-scrollbars", "--window-size=1200,2400", f"--screenshot={out}", page.as_uri() + fragment)
    done = _headless(chromium, out.parent / "profile", *args)
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
    # The explorer's label chips are coloured in both pages; what the plots add must still be plenty.
    assert _coloured_pixels(image) - _coloured_pixels(control) > 5000


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


def _explorer_data(page: Path) -> dict:  # type: ignore[type-arg]
    found = re.search(r"<script type='application/json' id='ex-data'>(.*?)</script>", page.read_text())
    assert found is not None, "the report holds no explorer data"
    return json.loads(found.group(1))


def _stored_top(run: Path, t: int) -> dict[str, tuple[list[int], np.ndarray]]:
    """Per method, test row ``t``'s top training indices and their scores, from the score files."""
    found = {}
    for name in json.loads((run / "results.json").read_text())["methods"]:
        row = ScoreStore(run / "scores").read(name).double().numpy()[t]
        order = np.argsort(-row, kind="stable")[:TOP]  # ties: lower training index first
        found[name] = (order.tolist(), row[order])
    return found


def test_explorer_embeds_each_methods_stored_top_k(user_run, tmp_path, capsys, monkeypatch) -> None:
    """The page's data hold, per test example and method, exactly the score file's top-k and scores, the
    run's trust verdicts, the training texts cut as every user text; and a (flagged) trace's answers."""
    run = tmp_path / "run"
    shutil.copytree(user_run, run)  # the trace is kept in the run; other tests see the fixture without it
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("question 3 please\nanother question\n")
    # The tiny model's answers resemble no training response, so the judge is fixed: answer 1 is flagged.
    monkeypatch.setattr(trace_module, "judge_labels", lambda answers, train: [None, "c1"])
    settings = TraceSettings(
        prompts=str(prompts), methods=("hessian-free", "repsim"), flag="c1", top=5, max_new_tokens=6
    )
    traced = trace(run, settings)
    assert run_cli(["report", str(run), "--quiet"], capsys)[0] == 0
    page = run / "report.html"
    data = _explorer_data(page)
    results = json.loads((run / "results.json").read_text())["methods"]
    train = [json.loads(line) for line in (user_run.parent / "data" / "train.jsonl").read_text().splitlines()]
    items = {item["key"]: item for item in data["items"]}
    assert [key for key in items if key.startswith("test:")] == [f"test:{t}" for t in range(6)]
    for t in (0, 4):
        item = items[f"test:{t}"]
        assert item["label"] == f"c{t % 2}" and item["prompt"].startswith(f"question {t} and then")
        for name, (order, scores) in _stored_top(run, t).items():
            assert [index for index, _ in item["top"][name]] == order, (t, name)
            assert [score for _, score in item["top"][name]] == pytest.approx(scores, rel=1e-5)
            assert item["trust"][name]["verdict"] == results[name]["trust"]["verdicts"][t]
    for index, entry in data["train"].items():
        assert entry["label"] == train[int(index)]["label"] and entry["id"] == f"train-{index}"
        assert entry["text"].startswith(f"question {index} and then") and "[cut:" in entry["text"]
    assert "must not reproduce in full and then" not in page.read_text()  # cut in the data too
    assert len(data["labels"]) == 2 and data["labels"]["c0"] != data["labels"]["c1"]

    answer = items[f"trace:{next((run / 'traces').glob('*.json')).stem}:1"]
    assert traced.kept == [1] and answer["label"] == "c1" and "flagged c1" in answer["kind"]
    for name, rows in traced.top.items():
        ids = [data["train"][str(index)]["id"] for index, _ in answer["top"][name]]
        assert ids == [entry["id"] for entry in rows[0]], name
        assert answer["trust"][name]["verdict"] == traced.trust[name]["verdicts"][0]

    # A run with an LDS shows each test example's measured LDS beside the predicted one.
    per_test = {name: [0.1 * t - 0.2 for t in range(6)] for name in results}
    lds = {"losses": {"attributed": {"methods": {n: {"per_test": v} for n, v in per_test.items()}}}}
    (run / "lds").mkdir()
    (run / "lds" / "lds.json").write_text(json.dumps(lds))
    measured = {item["key"]: item for item in explorer_data(run)["items"]}["test:4"]["trust"]
    assert {name: found["measured_lds"] for name, found in measured.items()} == pytest.approx(
        {name: values[4] for name, values in per_test.items()}
    )


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Rendered(HTMLParser):
    """What the explorer's script put into the page: the selected item's text, and per method column the
    training indices it lists in order (the JSON block is script text, never counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # > 0 inside the selected item's panel
        self.selected: list[str] = []
        self.columns: dict[str, list[int]] = {}
        self.method: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id") == "ex-selected" or (self.depth and tag not in VOID):
            self.depth += 1
        if found.get("data-method"):
            self.method = found["data-method"]
            self.columns[self.method] = []
        if found.get("data-train") is not None and self.method is not None:
            self.columns[self.method].append(int(found["data-train"] or -1))

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.selected.append(data)


def test_explorer_renders_a_selection_in_headless_chromium(user_run, tmp_path, capsys) -> None:
    """``report.html#test=K`` renders test K and each method's top training examples in the score file's
    order (test 0 is what shows without a selection, so K != 0 proves the fragment was read), and the
    screenshot shows the label chips the script draws."""
    chromium = _chromium()
    assert run_cli(["report", str(user_run), "--quiet"], capsys)[0] == 0
    page, k = user_run / "report.html", 4
    done = _headless(chromium, tmp_path / "profile", "--dump-dom", page.as_uri() + f"#test={k}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Uncaught" not in done.stderr
    rendered = _Rendered()
    rendered.feed(done.stdout)
    text = " ".join(" ".join(rendered.selected).split())
    test = json.loads((user_run.parent / "data" / "test.jsonl").read_text().splitlines()[k])
    assert " ".join(test["prompt"].split())[:80] + " [cut: not a built-in dataset]" in text
    assert f"test {k}" in text and f"test-{k}" in text and test["response"] in text
    expected = _stored_top(user_run, k)
    assert rendered.columns == {name: order for name, (order, _) in expected.items()}
    assert list(rendered.columns) == list(expected)  # the columns in the run's method order

    image, log = _screenshot(chromium, page, tmp_path / "selected.png", f"#test={k}")
    assert "Uncaught" not in log
    assert (image[..., :3].min(axis=-1) < 0.9).mean() > 0.02  # not a blank page
    # The chips of the top example's label are the script's drawing: without the script, none show.
    first = _explorer_data(page)["train"][str(expected["hessian-free"][0][0])]["label"]
    colour = _explorer_data(page)["labels"][first]
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<script>.*?</script>", "", page.read_text(), flags=re.S))
    control, _ = _screenshot(chromium, bare, tmp_path / "bare.png", f"#test={k}")
    assert _pixels_of(image, colour) > 300 and _pixels_of(control, colour) < 10


def _pixels_of(image: np.ndarray, colour: str) -> int:
    """Pixels within a small tolerance of ``colour`` (``#rrggbb``)."""
    rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.03).sum())
