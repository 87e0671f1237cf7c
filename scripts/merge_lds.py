"""Put methods scored later on the same retrains into an earlier ``lds.json`` record.

``llm-attr lds`` keeps each method's per-test LDS, not the retrained losses. When a method changes (or is
added) after a long LDS run, a new run with the same settings and subsets retrains the same models
(fine-tuning is deterministic on one machine) and scores the changed methods; this script copies their
entries into the earlier record. It first checks that the two records saw the same retrained losses:
every ``--check`` method (scored in both, unchanged) must have bit-identical per-test LDS in both.

    python scripts/merge_lds.py OLD.json NEW.json --methods kfac,ekfac --check hessian-free --out OUT.json

The merged record keeps OLD's controls and noise ceiling, and says in ``merged`` which methods came from
which record.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any


class MergeError(ValueError):
    """The two records cannot be merged (different retrains, or a method missing)."""


def merge(old: dict[str, Any], new: dict[str, Any], methods: list[str], check: list[str]) -> dict[str, Any]:
    """``old`` with ``methods``' entries taken from ``new``, after ``check`` proved the same retrains."""
    if not check:
        raise MergeError("name at least one --check method scored in both records")
    for key in ("task", "n_train", "n_test", "subsets", "subset_size"):
        if old.get(key) != new.get(key):
            raise MergeError(f"the records differ in {key}: {old.get(key)!r} and {new.get(key)!r}")
    merged = copy.deepcopy(old)
    for loss, entry in new["losses"].items():
        if loss not in old["losses"]:
            continue
        before, after = old["losses"][loss]["methods"], entry["methods"]
        for name in check:
            if name not in before or name not in after:
                raise MergeError(f"--check method {name} is not in both records ({loss} loss)")
            if before[name]["per_test"] != after[name]["per_test"]:
                raise MergeError(
                    f"{name}'s per-test LDS ({loss} loss) differ: the records did not see the same retrains"
                )
        for name in methods:
            if name not in after:
                raise MergeError(f"{name} is not in the new record ({loss} loss)")
            merged["losses"][loss]["methods"][name] = after[name]
    merged["methods"] = list(dict.fromkeys([*old.get("methods", []), *methods]))
    merged["merged"] = {
        "methods": methods,
        "checked_identical": check,
        "from_versions": new.get("versions"),
        "settings": new.get("method_settings", {}),
    }
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old", type=Path, help="the earlier lds.json")
    parser.add_argument("new", type=Path, help="the lds.json with the methods scored again")
    parser.add_argument("--methods", required=True, help="comma-separated methods to take from NEW")
    parser.add_argument("--check", default="hessian-free", help="comma-separated methods that must agree")
    parser.add_argument("--out", type=Path, required=True, help="where to write the merged record")
    args = parser.parse_args(argv)
    try:
        old, new = (json.loads(path.read_text()) for path in (args.old, args.new))
        methods, check = ([m for m in names.split(",") if m] for names in (args.methods, args.check))
        merged = merge(old, new, methods, check)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
