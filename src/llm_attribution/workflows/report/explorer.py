"""The report's explorer: pick or search a test example, a traced answer (``llm-attr trace``) or an
explained one (``llm-attr explain``) of a run, and see each method's top training examples side by side,
labels in colour, scores with their sign, and the method's trust verdict where the run has one.

The data go into the page as one inline JSON block and a small inline script renders them: no library,
no network, no font to fetch, so ``report.html`` stays one self-contained file. The selection is also
read from the address's fragment (``#test=3``, ``#item=KEY``, ``#search=WORDS``), so a selection can be
linked to and a headless browser can be driven to one.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ...core.storage import read_json
from ...data.schema import Example
from ...evaluation.metrics import rank_training
from ...scoring.store import ScoreStore
from ..layout import EXPLANATIONS_DIR, LDS_FILE, RESULTS_FILE, TRACES_DIR, lds_dir, scores_dir
from .texts import CUT, is_builtin, run_task, shown

TOP = 10  # training examples embedded per method and item: what keeps a large run's page small
TESTS = 1000  # test examples embedded at most; beyond that, evenly spaced over the test set

# Dark enough for white text, and none of them matplotlib's default cycle, so a label's chip is never
# mistaken for a plot's bar (and a screenshot can tell the two apart).
PALETTE = (
    "#0b6e99",
    "#b5179e",
    "#2d6a4f",
    "#c1440e",
    "#5a189a",
    "#8d6708",
    "#007f73",
    "#9d0208",
    "#3a5a40",
    "#5c4d7d",
)

SIGN = (
    "Score: higher = the training example supports the test output more; a negative score = it opposes "
    "it. Each method has its own scale, so compare ranks across columns, not raw scores."
)
TRUST = (
    "Trust: the verdict of 'Should these rankings be trusted?' for this example and method (high, medium, "
    "low: predicted from the methods' top-k agreement and the score margin; hover for the signals)."
)
LEGEND = 30  # labels named in the legend at most; every label keeps its colour beyond that


def label_colours(labels: set[str]) -> dict[str, str]:
    """A colour per label, the same wherever the label shows on the page (and in every report of the
    run): labels in sorted order take the palette's colours, then hues a golden angle apart."""
    ordered = sorted(labels)
    return {
        label: PALETTE[i] if i < len(PALETTE) else f"hsl({(i * 137.5) % 360:.0f},55%,35%)"
        for i, label in enumerate(ordered)
    }


def explorer_data(run: Path, top: int = TOP, tests: int = TESTS) -> dict[str, Any]:
    """Everything the explorer shows for ``run``: its test examples (at most ``tests``), its traced and
    explained answers, each with every method's top ``top`` training examples (training index and
    score) and trust; the training examples those rankings name, once each; a colour per label."""
    config, task = run_task(run)
    builtin = is_builtin(config)
    collected = _Collected(task.train, builtin)
    picks = np.linspace(0, len(task.test) - 1, num=min(tests, len(task.test))).round().astype(int)
    items = _tests(run, task.test, picks, top, collected)
    items += _traces(run, top, collected)
    items += _explanations(run, top, collected)
    labels = {e.label for e in (*task.train, *task.test)} | {i["label"] for i in items if i["label"]}
    return {
        "top": top,
        "n_train": len(task.train),
        "n_test": len(task.test),
        "tests_shown": len(picks),
        "cut": None if builtin else CUT,
        "labels": label_colours(labels),
        "legend": LEGEND,
        "train": collected.train,
        "items": items,
    }


class _Collected:
    """The training examples the rankings name, keyed by training index, each text shown as the report
    shows user texts; a trace's or explanation's rankings name examples by id, mapped to the index."""

    def __init__(self, train: tuple[Example, ...], builtin: bool) -> None:
        self.examples = train
        self.builtin = builtin
        self.index = {e.id: i for i, e in enumerate(train)}
        self.train: dict[str, dict[str, str]] = {}

    def entry(self, index: int, score: float) -> list[Any]:
        if str(index) not in self.train:
            example = self.examples[index]
            self.train[str(index)] = {
                "id": example.id,
                "label": example.label,
                "text": f"{self.text(example.prompt)} => {self.text(example.response)}",
            }
        return [index, _number(score)]

    def by_id(self, rows: list[dict[str, Any]], top: int) -> list[list[Any]]:
        # An id the run's training set lacks would come from a trace kept before the run's data changed;
        # such a ranking cannot be shown against this run's examples, so its entries are left out.
        return [self.entry(self.index[r["id"]], r["score"]) for r in rows[:top] if r["id"] in self.index]

    def text(self, text: str) -> str:
        return shown(text, self.builtin)


def _number(value: float | None) -> float | None:
    """A score or statistic as the page shows it: 6 significant digits, None when undefined (JSON has
    no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


def _tests(
    run: Path, test: tuple[Example, ...], picks: np.ndarray, top: int, collected: _Collected
) -> list[dict[str, Any]]:
    methods = read_json(run / RESULTS_FILE)["methods"]
    measured = {}
    if (lds_dir(run) / LDS_FILE).is_file():
        measured = read_json(lds_dir(run) / LDS_FILE)["losses"]["attributed"]["methods"]
    store = ScoreStore(scores_dir(run))
    tops: dict[str, list[list[list[Any]]]] = {}
    for name in methods:
        rows = store.read(name).double().numpy()[picks]
        order = rank_training(rows)[:, :top]  # ties by lower training index, as every metric ranks
        tops[name] = [[collected.entry(int(j), rows[r, j]) for j in order[r]] for r in range(len(picks))]
    items = []
    for r, t in enumerate(picks.tolist()):
        example = test[t]
        trust = {
            name: _row_trust(entry["trust"], measured.get(name), t, len(test))
            for name, entry in methods.items()
            if "trust" in entry
        }
        items.append(
            {
                "key": f"test:{t}",
                "kind": "test example",
                "title": f"test {t}",
                "id": example.id,
                "label": example.label,
                "prompt": collected.text(example.prompt),
                "response": collected.text(example.response),
                "top": {name: tops[name][r] for name in methods},
                "trust": trust,
            }
        )
    return items


def _row_trust(reading: dict[str, Any], lds: dict[str, Any] | None, row: int, rows: int) -> dict[str, Any]:
    """One row's verdict from a trust reading (``results.json``'s per test example, a trace's per kept
    answer), with the row's measured LDS where the run has one for each of its ``rows``."""
    found = _trust_entry(
        reading["verdicts"][row],
        reading["predicted_lds"][row],
        reading["agreement"][row],
        reading["margin"][row],
        reading["calibrated"],
    )
    if lds is not None and len(lds["per_test"]) == rows:
        found["measured_lds"] = _number(lds["per_test"][row])
    return found


def _trust_entry(
    verdict: str, predicted: float | None, agreement: float | None, margin: float | None, calibrated: bool
) -> dict[str, Any]:
    """One verdict and its signals as the page shows them."""
    return {
        "verdict": verdict,
        "predicted_lds": _number(predicted),
        "agreement": _number(agreement),
        "margin": _number(margin),
        "calibrated": calibrated,
    }


def _traces(run: Path, top: int, collected: _Collected) -> list[dict[str, Any]]:
    """Every kept answer of every trace of the run, with its trust where the trace judged it (a trace
    kept before traces judged trust has none)."""
    items = []
    for path in sorted((run / TRACES_DIR).glob("*.json")):
        record = read_json(path)
        flag = record["flag"]
        kept = len(record["kept"])
        for row, i in enumerate(record["kept"]):
            items.append(
                {
                    "key": f"trace:{path.stem}:{i}",
                    "kind": f"traced answer, flagged {flag}" if flag else "traced answer",
                    "title": f"answer {i} (trace {path.stem[:6]})",
                    "id": f"answer-{i}",
                    "label": record["judged"][i],
                    "prompt": collected.text(record["prompts"][i]),
                    "response": collected.text(record["answers"][i]),
                    "top": {name: collected.by_id(rows[row], top) for name, rows in record["top"].items()},
                    "trust": {
                        name: _row_trust(reading, None, row, kept)
                        for name, reading in record.get("trust", {}).items()
                    },
                }
            )
    return items


def _explanations(run: Path, top: int, collected: _Collected) -> list[dict[str, Any]]:
    """Every answer ``explain`` kept for the run, with the trust it judged."""
    items = []
    for path in sorted((run / EXPLANATIONS_DIR).glob("*.json")):
        record = read_json(path)
        items.append(
            {
                "key": f"explain:{path.stem}",
                "kind": "explained answer" + (" (generated by the model)" if record["generated"] else ""),
                "title": f"explained {path.stem[:6]}",
                "id": "query",
                "label": None,
                "prompt": collected.text(record["prompt"]),
                "response": collected.text(record["response"]),
                "top": {name: collected.by_id(rows, top) for name, rows in record["methods"].items()},
                "trust": {
                    name: _trust_entry(
                        found["verdict"],
                        found["predicted_lds"],
                        found["agreement"],
                        found["margin"],
                        found.get("calibrated", True),
                    )
                    for name, found in record.get("trust", {}).items()
                },
            }
        )
    return items


def explorer_html(data: dict[str, Any], where: Path) -> str:
    """The explorer's section of ``report.html``: its controls, its data and the script that renders
    them."""
    traced = sum(item["key"].startswith("trace:") for item in data["items"])
    explained = sum(item["key"].startswith("explain:") for item in data["items"])
    scope = [
        f"{data['tests_shown']} of {data['n_test']} test examples"
        + ("" if data["tests_shown"] == data["n_test"] else " (evenly spaced)"),
        f"{traced} traced answers (llm-attr trace)",
        f"{explained} explained answers (llm-attr explain)",
    ]
    notes = (
        f"Run folder {where}: {', '.join(scope)}. Each method's top {data['top']} of {data['n_train']} "
        "training examples are embedded per item (the score files hold the full rankings)."
        + (
            ""
            if data["cut"] is None
            else f" Texts are cut to {data['cut']} characters: the data set is not a built-in one."
        )
        + " Link to a selection with #test=K, #item=KEY or #search=WORDS after the page's address."
    )
    # "<" escaped inside JSON, so no text can close the script element that holds it.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return (
        f"<section id='explorer'><h2>Explore: each method's top training examples</h2>"
        f"<style>{_CSS}</style><p class='ex-note'>{html.escape(notes)}</p>"
        "<div class='ex-pick'><div class='ex-side'>"
        "<input id='ex-search' type='search' placeholder='search by text, label, id or kind' "
        "aria-label='search test examples and answers'><div id='ex-count' class='ex-note'></div>"
        "<select id='ex-list' size='14' aria-label='test examples and answers'></select></div>"
        "<div id='ex-selected'></div></div>"
        f"<p class='ex-sign'>{html.escape(SIGN)}<br>{html.escape(TRUST)}</p><div id='ex-grid'></div>"
        f"<script type='application/json' id='ex-data'>{payload}</script>"
        f"<script>{_SCRIPT}</script></section>"
    )


_CSS = """
#explorer{border:1px solid #ccc;border-radius:6px;padding:8px 12px;margin:1em 0}
#explorer .ex-note{color:#555;font-size:12px}
#explorer .ex-pick{display:flex;gap:14px;align-items:flex-start}
#explorer .ex-side{flex:0 0 330px}
#ex-search{width:100%;box-sizing:border-box;padding:4px;font-size:13px}
#ex-list{width:100%;font-size:12px;margin-top:4px}
#ex-selected{flex:1;font-size:13px;min-width:0}
#ex-selected .ex-text{background:#f6f6f6;padding:4px 6px;margin:3px 0;overflow-wrap:anywhere}
#explorer .ex-sign{font-size:12px;color:#333;border-left:3px solid #888;padding-left:6px}
#ex-grid{display:grid;grid-auto-flow:column;grid-auto-columns:minmax(230px,1fr);gap:10px;overflow-x:auto}
#ex-grid h4{margin:2px 0;font-size:14px}
#ex-grid ol{padding-left:0;margin:4px 0;list-style:none}
#ex-grid li{border-left:5px solid #ccc;padding:2px 6px;margin-bottom:5px;font-size:12px;background:#fafafa}
#ex-grid .ex-text{color:#333;overflow-wrap:anywhere}
#explorer .ex-chip{color:#fff;border-radius:3px;padding:0 5px;margin:0 3px;font-size:11px;white-space:nowrap}
#explorer .ex-own{font-weight:bold;outline:2px solid #000;outline-offset:1px}
#explorer .ex-score{font-family:monospace;font-weight:bold}
#explorer .ex-dim{color:#666;font-size:11px}
#explorer .ex-trust{font-size:11px;border:1px solid;border-radius:3px;padding:1px 4px;display:inline-block}
#explorer .ex-trust.high{color:#1b5e20}#explorer .ex-trust.medium{color:#8a5a00}
#explorer .ex-trust.low{color:#b71c1c}#explorer .ex-trust.unknown,#explorer .ex-trust.none{color:#666}
"""

# Every text goes into the page through textContent, never as markup: a training example's text is data.
_SCRIPT = """
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("ex-data").textContent);
  const box = document.getElementById("ex-search");
  const list = document.getElementById("ex-list");
  const count = document.getElementById("ex-count");
  const selected = document.getElementById("ex-selected");
  const grid = document.getElementById("ex-grid");
  const byKey = new Map(data.items.map((item) => [item.key, item]));
  const haystack = new Map(data.items.map((item) => [item.key, [item.title, item.kind, item.id,
    item.label || "", item.prompt, item.response].join(" ").toLowerCase()]));
  let current = null;

  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const chip = (label, own) => {
    const node = el("span", "ex-chip" + (own ? " ex-own" : ""), label === null ? "no label" : label);
    node.style.background = data.labels[label] || "#777";
    if (own) node.title = "the selected example's own label";
    return node;
  };
  const signed = (x) => x === null ? "n/a" : (x >= 0 ? "+" : "\\u2212") + Math.abs(x).toPrecision(4);

  function filtered() {
    const terms = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
    return data.items.filter((item) => terms.every((t) => haystack.get(item.key).includes(t)));
  }

  function fillList(items) {
    list.replaceChildren(...items.map((item) => {
      const head = `${item.title} [${item.label === null ? "no label" : item.label}] ${item.prompt}`;
      const option = el("option", null, head.length > 90 ? head.slice(0, 89) + "\\u2026" : head);
      option.value = item.key;
      option.selected = item.key === current;
      return option;
    }));
    count.textContent = `${items.length} of ${data.items.length} shown`;
  }

  function trustLine(trust, item) {
    if (!trust) {
      const why = item.key.startsWith("trace:") ? "none kept by this trace" : "none in this run";
      return el("span", "ex-trust none", `trust: ${why}`);
    }
    let text = `trust: ${trust.verdict}`;
    if (trust.verdict === "unknown") text += " (a verdict needs two or more methods)";
    else if (trust.predicted_lds !== null) text += ` (predicted LDS ${trust.predicted_lds.toFixed(2)})`;
    if ("measured_lds" in trust && trust.measured_lds !== null)
      text += `, measured LDS ${trust.measured_lds.toFixed(2)}`;
    const node = el("span", "ex-trust " + trust.verdict, text);
    node.title = `top-k agreement with the other methods ${trust.agreement}, score margin ${trust.margin}` +
      (trust.calibrated ? "" : "; the calibration never saw this method: an extrapolation");
    return node;
  }

  function show(item) {
    selected.replaceChildren();
    grid.replaceChildren();
    if (!item) {
      selected.append(el("p", "ex-note", "No test example or answer matches."));
      return;
    }
    current = item.key;
    const head = el("div");
    head.append(el("b", null, `${item.title} `), el("span", "ex-dim", `${item.kind}, id ${item.id} `),
      chip(item.label, true));
    const legend = el("div", "ex-dim", "labels: ");
    Object.keys(data.labels).slice(0, data.legend).forEach((label) => legend.append(chip(label, false), " "));
    legend.append("(outlined: the selected example's own label)");
    selected.append(head, el("div", "ex-dim", "prompt"), el("div", "ex-text", item.prompt),
      el("div", "ex-dim", "response"), el("div", "ex-text", item.response), legend);
    for (const [method, entries] of Object.entries(item.top)) {
      const column = el("div", "ex-col");
      column.dataset.method = method;
      column.append(el("h4", null, method), trustLine(item.trust[method], item));
      const ranked = el("ol");
      entries.forEach(([index, score], rank) => {
        const train = data.train[String(index)];
        const own = item.label !== null && train.label === item.label;
        const entry = el("li", "ex-entry");
        entry.dataset.train = String(index);
        entry.style.borderLeftColor = data.labels[train.label] || "#777";
        const line = el("div");
        line.append(el("span", "ex-dim", `${rank + 1}. `), el("span", "ex-score", signed(score)),
          el("span", "ex-dim", score === null ? " " : score >= 0 ? " supports " : " opposes "),
          chip(train.label, own), el("span", "ex-dim", ` #${index} ${train.id}`));
        entry.append(line, el("div", "ex-text", train.text));
        ranked.append(entry);
      });
      if (!entries.length) ranked.append(el("li", "ex-dim", "no ranking kept for this item"));
      column.append(ranked);
      grid.append(column);
    }
  }

  function fromHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.has("search")) box.value = params.get("search");
    const wanted = params.has("test") ? `test:${params.get("test")}` : params.get("item");
    const items = filtered();
    const item = wanted !== null ? byKey.get(wanted) : items[0];
    if (wanted !== null && !item) {
      current = null;
      fillList(items);
      show(null);
      selected.replaceChildren(el("p", "ex-note", `${wanted} is not in this page.`));
      return;
    }
    current = item ? item.key : null;
    fillList(items);
    show(item);
  }

  function linkTo(key) {
    const params = new URLSearchParams();
    if (key.startsWith("test:")) params.set("test", key.slice(5)); else params.set("item", key);
    if (box.value) params.set("search", box.value);
    return "#" + params.toString();
  }

  list.addEventListener("change", () => { location.hash = linkTo(list.value); });
  box.addEventListener("input", () => {
    const items = filtered();
    if (!items.some((item) => item.key === current)) current = items.length ? items[0].key : null;
    fillList(items);
    show(current === null ? null : byKey.get(current));
    if (current !== null) history.replaceState(null, "", linkTo(current));
  });
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
"""
