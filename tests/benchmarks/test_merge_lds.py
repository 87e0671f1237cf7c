"""scripts/merge_lds.py: methods scored again on the same retrains replace their entries, and only when a
method scored in both records proves the retrains were the same."""

from __future__ import annotations

import json
from typing import Any

import pytest
from scripts.merge_lds import MergeError, main, merge


def _record(per_test: dict[str, list[float]]) -> dict[str, Any]:
    methods = {
        m: {"mean": sum(v) / len(v), "ci95": [min(v), max(v)], "per_test": v} for m, v in per_test.items()
    }
    return {
        "task": "grammars",
        "n_train": 100,
        "n_test": 3,
        "subsets": 32,
        "subset_size": 50,
        "methods": list(per_test),
        "controls": {"random": 0.0},
        "losses": {"attributed": {"methods": methods, "noise_ceiling": {"mean": 0.7}}},
    }


OLD = _record({"hessian-free": [0.1, 0.2, 0.3], "kfac": [0.5, 0.5, 0.5], "less": [0.9, 0.8, 0.7]})


def test_the_new_methods_replace_the_old_and_the_rest_is_kept() -> None:
    new = _record({"hessian-free": [0.1, 0.2, 0.3], "kfac": [0.4, 0.6, 0.6], "ekfac": [0.2, 0.2, 0.2]})
    merged = merge(OLD, new, ["kfac", "ekfac"], ["hessian-free"])
    methods = merged["losses"]["attributed"]["methods"]
    assert methods["kfac"]["per_test"] == [0.4, 0.6, 0.6] and methods["ekfac"]["per_test"] == [0.2, 0.2, 0.2]
    assert methods["less"] == OLD["losses"]["attributed"]["methods"]["less"]
    assert merged["losses"]["attributed"]["noise_ceiling"] == {"mean": 0.7}
    assert merged["methods"] == ["hessian-free", "kfac", "less", "ekfac"]
    assert merged["merged"]["methods"] == ["kfac", "ekfac"]
    assert OLD["losses"]["attributed"]["methods"]["kfac"]["per_test"] == [0.5, 0.5, 0.5]  # not mutated


def test_other_retrains_are_refused() -> None:
    new = _record({"hessian-free": [0.1, 0.2, 0.30000001], "kfac": [0.4, 0.6, 0.6]})
    with pytest.raises(MergeError, match="same retrains"):
        merge(OLD, new, ["kfac"], ["hessian-free"])
    with pytest.raises(MergeError, match="at least one"):
        merge(OLD, new, ["kfac"], [])


def test_the_command_line_says_one_line_and_exits_2(tmp_path, capsys) -> None:
    old, new, out = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "out.json"
    old.write_text(json.dumps(OLD))
    new.write_text(json.dumps(_record({"hessian-free": [0.1, 0.2, 0.3]})))
    assert main([str(old), str(new), "--methods", "kfac", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kfac is not in the new record" in err and not out.exists()
