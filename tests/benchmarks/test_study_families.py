"""Which family leads a task: the label-blind best, the methods its paired interval does not separate from it
whichever way round the pair was stored, and each family's best member."""

from __future__ import annotations

from scripts.study_families import table


def _method(coverage: float, uses_labels: bool = False) -> dict:
    return {"coverage": {"mean": coverage}, "notes": {"uses_labels": True} if uses_labels else {}}


def test_the_label_blind_best_its_ties_and_each_familys_best() -> None:
    record = {
        "tasks": {
            "t": {
                "ekfac": _method(0.9),
                "kfac": _method(0.8),
                "less": _method(0.85),
                "exact": _method(0.5),
                "knn-shapley": _method(1.0, uses_labels=True),  # reads labels: never the best
            }
        },
        "paired": {
            "t": [
                # stored as less minus ekfac, interval includes 0: a tie with the best
                {
                    "a": "less",
                    "b": "ekfac",
                    "metric": "coverage",
                    "mean": -0.05,
                    "ci_low": -0.1,
                    "ci_high": 0.01,
                    "resolved": False,
                },
                {
                    "a": "ekfac",
                    "b": "exact",
                    "metric": "coverage",
                    "mean": 0.4,
                    "ci_low": 0.3,
                    "ci_high": 0.5,
                    "resolved": True,
                },
                # a tie that does not involve the best is not listed
                {
                    "a": "kfac",
                    "b": "less",
                    "metric": "coverage",
                    "mean": -0.05,
                    "ci_low": -0.1,
                    "ci_high": 0.01,
                    "resolved": False,
                },
            ]
        },
    }
    row = table(record, "coverage").splitlines()[-1]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == ["t", "ekfac 0.900", "less"]
    assert "ekfac 0.900" in cells[3:] and "less 0.850" in cells[3:] and "exact 0.500" in cells[3:]
    assert "knn-shapley 1.000" in cells[3:]
