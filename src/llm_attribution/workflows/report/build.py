"""``llm-attr report DIR``: a study or run folder as ``report.html`` (self-contained) and ``report.md``.

Contents: the grid with 95% intervals (a single run counts as a one-seed grid), the diagnostics found in
the run folders, the study's own 7B figures from its official score files where those exist, and each
method's top training examples for a few test examples; in ``report.html`` an explorer of every test
example's and traced answer's top training examples per method (``explorer.py``). Texts of datasets that
are not built-in are cut short and marked, so a report never reproduces a harmful training example in full.
Scores: HIGHER = the training example supports the test output more.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...core.errors import RunError
from ...core.settings import REQUIRED, option, require
from ...core.storage import read_json, write_bytes_atomic
from ...evaluation.grid import paired_differences, paired_markdown, per_class_markdown, study_markdown
from ...scoring.store import ScoreStore
from ..layout import (
    REPORT_HTML,
    REPORT_MD,
    RESULTS_FILE,
    STUDY_FILE,
    diagnostic_file,
    scores_dir,
)
from ..study import judge_task
from ..study_cells import cell_from_scores
from .explanations import explanations_section
from .explorer import explorer_data, explorer_html
from .figures import grid_figure, lines_figure, panels_figure, spectrum_figure
from .ground_truth import ground_truth_sections
from .published import published_table
from .texts import is_builtin, run_task, shown
from .trust import trust_section

EXAMPLES = 3
TOP = 3


@dataclass
class Report:
    """Sections in order: (title, markdown text, figures as name -> PNG bytes); the explorer's HTML, which
    only ``report.html`` can hold (empty: none)."""

    sections: list[tuple[str, str, dict[str, bytes]]] = field(default_factory=list)
    explorer: str = ""

    def add(self, title: str, text: str, figures: dict[str, bytes] | None = None) -> None:
        self.sections.append((title, text, figures or {}))


def _runs(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.rglob(RESULTS_FILE))


@dataclass(frozen=True)
class ReportSettings:
    """The folder to report on, and where the study's own data are for its figures beside ours."""

    folder: str = option(
        REQUIRED, "a study folder (study.json) or a run folder (results.json)", positional=True
    )
    official_scores: str = option(
        "../shared/data/official-scores", "the study's official score files, shown beside ours when present"
    )
    examples: int = option(
        EXAMPLES,
        "test examples whose top training examples report.md lists (0: none, and no explorer in report.html)",
    )
    data_root: str = option(
        "../shared/data/paper-datasets", "the study's datasets, for the official scores' labels"
    )

    def __post_init__(self) -> None:
        require(self.examples >= 0, f"--examples must be >= 0, got {self.examples}")


def build_report(
    folder: Path, official_root: Path | None = None, data_root: Path | None = None, examples: int = EXAMPLES
) -> Report:
    """Collect every section of the report for a study or run folder (``examples=0``: no example texts)."""
    report = Report()
    if (folder / STUDY_FILE).is_file():
        record = read_json(folder / STUDY_FILE)
    elif (folder / RESULTS_FILE).is_file():
        _config, task = run_task(folder)
        methods = list(read_json(folder / RESULTS_FILE)["methods"])
        labels = ([e.label for e in task.train], [e.label for e in task.test])
        judged = judge_task({0: cell_from_scores(folder, labels, methods)}, methods)
        record = {"tasks": {task.name: judged}, "paired": {task.name: paired_differences(judged)}}
    else:
        raise RunError(
            f"{folder} holds neither {STUDY_FILE} nor {RESULTS_FILE}; run `llm-attr study` or `run`"
        )
    report.add(
        "Attribution grid",
        "Mean over test examples (and seeds), [95% interval resampling seeds and test examples; accuracy's "
        "no narrower than its Wilson interval]; coverage cap = the highest coverage any ranking can reach "
        "with the task's class counts, coverage / cap = how much of it a method reaches; seed sd = "
        "standard deviation of accuracy / coverage over fine-tuning seeds. "
        "Scores: higher = supports the test output more.\n\n" + study_markdown(record),
        {f"grid-{m}": grid_figure(record["tasks"], m) for m in ("accuracy", "coverage")},
    )
    if record.get("paired"):
        report.add(
            "Is the best method better? Paired differences",
            "Per task, the method with the highest coverage minus each other method, on the same seeds and "
            "test examples (resampled together, so what they share cancels); resolved = the 95% interval "
            "excludes 0.\n\n" + paired_markdown(record),
        )
    report.add("Per-class breakdown", per_class_markdown(record))
    if official_root is not None and data_root is not None and official_root.is_dir():
        report.add("The study's 7B figures (official score files)", published_table(official_root, data_root))
    for run in _runs(folder):
        _diagnostics(report, run, folder)
        trust = trust_section(run, run.relative_to(folder.parent))
        if trust is not None:
            report.add(*trust)
        for section in ground_truth_sections(run, run.relative_to(folder.parent)):
            report.add(*section)
        explained = explanations_section(run, run.relative_to(folder.parent))
        if explained is not None:
            report.add(*explained)
    first = _runs(folder)[:1]
    if first and examples > 0:
        where = first[0].relative_to(folder.parent)
        report.add(f"Top training examples ({where})", _examples(first[0], examples))
        report.explorer = explorer_html(explorer_data(first[0]), where)
    return report


def _diagnostics(report: Report, run: Path, root: Path) -> None:
    where = run.relative_to(root.parent)
    if diagnostic_file(run, "spectrum").is_file():
        spectrum = read_json(diagnostic_file(run, "spectrum"))
        summary = ", ".join(f"{k.removeprefix('median_')} {v:.4g}" for k, v in spectrum["summary"].items())
        report.add(
            f"Fisher spectrum ({where})",
            f"Medians over blocks: {summary}.",
            {f"spectrum-{run.name}": spectrum_figure(spectrum["blocks"])},
        )
    if diagnostic_file(run, "ihvp").is_file():
        points = read_json(diagnostic_file(run, "ihvp"))["points"]
        scales = [p["damping_scale"] for p in points]
        names = list(points[0]["relative_error"]) if points else []
        errors = {m: [p["relative_error"][m] for p in points] for m in names}
        rho = {
            f"{m} vs {ref}": [p[f"rank_correlation_vs_{key}"][m] for p in points]
            for key, ref, members in (("hessian_free", "HF", [*names, "exact"]), ("exact", "exact", names))
            for m in members
        }
        report.add(
            f"iHVP error and rank agreement over damping ({where})",
            "Median over blocks of ||approx - exact|| / ||exact||; mean Spearman correlation over tests.",
            {
                f"ihvp-error-{run.name}": lines_figure(
                    scales, errors, "damping scale", "relative error", "iHVP error vs exact", log="xy"
                ),
                f"ihvp-rank-{run.name}": lines_figure(
                    scales, rho, "damping scale", "Spearman", "Rank agreement of scores", log="x"
                ),
            },
        )
    if diagnostic_file(run, "convergence").is_file():
        rows = read_json(diagnostic_file(run, "convergence"))["epochs"]
        epochs = [r["epoch"] for r in rows]
        methods = list(rows[0]["methods"]) if rows else []
        quality = {
            metric: {m: [r["methods"][m][metric] for r in rows] for m in methods}
            for metric in ("accuracy", "coverage")
        }
        report.add(
            f"Convergence ({where})",
            "Each method's accuracy and coverage with each epoch's adapter; the training and test loss; and "
            "the mean cosine between a training example's gradient at this epoch and at the one before.",
            {
                f"convergence-{run.name}": panels_figure(
                    epochs,
                    "epoch",
                    [
                        ("Accuracy by epoch", "accuracy", quality["accuracy"]),
                        ("Coverage by epoch", "coverage", quality["coverage"]),
                        (
                            "Loss and gradient turn",
                            "value",
                            {
                                "train loss": [r["train_loss"] for r in rows],
                                "test loss": [r["test_loss"] for r in rows],
                                "gradient cosine with previous epoch": [
                                    r["gradient_cosine_with_previous"] for r in rows
                                ],
                            },
                        ),
                    ],
                )
            },
        )
    if diagnostic_file(run, "parameters").is_file():
        rows = read_json(diagnostic_file(run, "parameters"))["epochs"]
        epochs = [r["epoch"] for r in rows]
        norms = [r["update_norm_total"] for r in rows]
        report.add(
            f"Parameter change vs behaviour ({where})",
            "Left: ||(alpha/r) B A|| over all adapted modules. Middle: mean test loss. Right (tasks with "
            "triggered examples): the share of triggered test prompts whose greedy answer behaves like their "
            "triggered class, and of clean prompts that do (control).",
            {
                f"parameters-{run.name}": panels_figure(
                    epochs,
                    "epoch",
                    [
                        ("Parameter change", "||BA||", {"all modules": norms}),
                        ("Test loss", "loss", {"test loss": [r["test_loss"] for r in rows]}),
                        (
                            "Behaviour",
                            "rate",
                            {
                                "trigger rate": [r["trigger_rate"] for r in rows],
                                "clean control": [r["clean_control_rate"] for r in rows],
                            },
                        ),
                    ],
                )
            },
        )


def _examples(run: Path, count: int) -> str:
    config, task = run_task(run)
    builtin = is_builtin(config)

    def show(text: str) -> str:
        return shown(text, builtin)

    lines = []
    picks = np.linspace(0, len(task.test) - 1, num=min(count, len(task.test))).astype(int)
    for name in read_json(run / RESULTS_FILE)["methods"]:
        scores = ScoreStore(scores_dir(run)).read(name).double().numpy()
        for t in picks:
            test = task.test[t]
            lines.append(f"- **{name}**, test `{test.id}` [{test.label}]: {show(test.prompt)}")
            for rank, i in enumerate(np.argsort(-scores[t], kind="stable")[:TOP], 1):
                ex = task.train[i]
                lines.append(
                    f"  {rank}. {scores[t, i]:.4g} [{ex.label}] {show(ex.prompt)} => {show(ex.response)}"
                )
    return "\n".join(lines)


def write_report(report: Report, folder: Path) -> tuple[Path, Path]:
    """``report.md`` (figures as PNG files in ``report/``) and a self-contained ``report.html``."""
    md, body = ["# llm-attribution report", ""], []
    for title, text, figures in report.sections:
        md += [f"## {title}", "", text, ""]
        body.append(f"<h2>{html.escape(title)}</h2>{_md_to_html(text)}")
        for name, png in figures.items():
            write_bytes_atomic(folder / "report" / f"{name}.png", png)
            md += [f"![{name}](report/{name}.png)", ""]
            body.append(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>llm-attribution report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}</style></head><body>"
        "<h1>llm-attribution report</h1>" + report.explorer + "".join(body) + "</body></html>"
    )
    write_bytes_atomic(folder / REPORT_MD, "\n".join(md).encode())
    write_bytes_atomic(folder / REPORT_HTML, page.encode())
    return folder / REPORT_HTML, folder / REPORT_MD


def _md_to_html(text: str) -> str:
    """The few Markdown shapes the report uses: pipe tables, list lines, paragraphs."""
    out, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                table.append([_inline(c.strip()) for c in line.strip("|").split("|")])
            continue
        if table:
            head, *rows = table
            out.append(
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
            table = []
        if line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    return "".join(out)


def _inline(text: str) -> str:
    """``**bold**`` and `` `code` `` after escaping, so the Markdown marks do not show in the page."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)
