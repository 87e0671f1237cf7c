"""Which family leads a task: the label-blind best, the methods its paired interval does not separate from it
whichever way round the pair was stored, and each family's best member."""

from __future__ import annotations

from scripts.study_families import lds_table, table


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


def _lds(means: dict[str, float]) -> dict:
    return {"losses": {"attributed": {"methods": {m: {"mean": v} for m, v in means.items()}}}}


def test_proxy_and_lds_rankings_compared_over_the_label_blind_methods_measured_both_ways() -> None:
    record = {
        "tasks": {
            "t": {
                "ekfac": _method(0.9),
                "less": _method(0.8),
                "repsim": _method(0.95),
                "exact": _method(0.5),
                "knn-shapley": _method(1.0, uses_labels=True),
            },
            "no-lds": {"ekfac": _method(0.9)},
        },
        "paired": {},
    }
    # LDS orders the four label-blind methods less > ekfac > exact > repsim, coverage repsim > ekfac > less >
    # exact. Ranks (1 = lowest) of (ekfac, less, repsim, exact): coverage (3, 2, 4, 1), LDS (3, 4, 1, 2), so
    # d^2 = 0 + 4 + 9 + 1 = 14 and rho = 1 - 6 * 14 / (4 * 15) = -0.40. knn-shapley reads the labels and
    # magic is not in the grid: neither is ranked.
    means = {"ekfac": 0.7, "less": 0.8, "repsim": 0.3, "exact": 0.5, "knn-shapley": 0.99, "magic": 0.9}
    lds = {"t": _lds(means)}
    lines = lds_table(record, lds, "coverage").splitlines()
    assert len(lines) == 3  # header, rule, and only the task with an LDS record
    cells = [cell.strip() for cell in lines[-1].strip("|").split("|")]
    assert cells[:5] == ["t", "4", "-0.40", "repsim 0.950", "less 0.80"]
    assert "less 0.80" in cells[5:] and "repsim 0.30" in cells[5:] and "exact 0.50" in cells[5:]
