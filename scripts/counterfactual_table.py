"""Print an `llm-attr counterfactual` record as Markdown: per group, one row per k, each source's mean
response-loss change (behaviour rate), the baselines as the mean over their draws with their spread.

    python scripts/counterfactual_table.py RUN/counterfactual/counterfactual.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llm_attribution.workflows.counterfactual import group_cells


def table(record: dict) -> str:  # type: ignore[type-arg]
    sources = [*record["methods"], *record["baselines"]]
    spread = {(r["group"], r["source"], r["k"]): r for r in record.get("baseline_draws", [])}
    lines = []
    for group in record["groups"]:
        cells = group_cells(record, group["label"])
        lines += [
            f"Group `{group['label']}`: {group['n_test']} test examples, {group['n_train_of_class']} "
            f"training examples of its class; full data: response loss {group['full_response_loss']:.3f}, "
            f"behaviour rate {group['full_behaviour_rate']:.2f}.",
            "",
            "| k | " + " | ".join(sources) + " |",
            "|---|" + "---|" * len(sources),
        ]
        for k in record["settings"]["k"]:
            row = []
            for source in sources:
                cell = cells.get((source, k))
                if cell is None:
                    row.append("-")
                    continue
                text = f"{cell['response_loss_change']:+.3f}"
                drawn = spread.get((group["label"], source, k))
                if drawn is not None and drawn["draws"] > 1:
                    text += f" ± {drawn['response_loss_change']['sd']:.3f}"
                if "behaviour_rate" in cell:
                    text += f" ({cell['behaviour_rate']:.2f})"
                row.append(text)
            lines.append(f"| {k} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())))
