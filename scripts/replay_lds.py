"""LDS against MAGIC's own counterfactual beside the retrained one.

`llm-attr lds` retrains each subset from scratch: a new shuffle of the kept examples, fewer steps per
epoch. MAGIC's metagradient is the derivative of another counterfactual: the run replayed with the
removed examples' weights set to 0 and every batch, step and dropout mask as recorded. This script
replays the run once per LDS subset with those weights (``TrainingReplay.run``), measures each test
example's attributed loss, and prints every scored method's LDS against both sets of losses, so that a
method's LDS can be read against the counterfactual it models.

    python scripts/replay_lds.py RUN                 # RUN: a run folder `llm-attr lds` has filled
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from llm_attribution.core.progress import progress
from llm_attribution.data.templates import encode_examples
from llm_attribution.evaluation.lds import lds_per_test, spearman_rows
from llm_attribution.evaluation.score_files import read_scores
from llm_attribution.evaluation.statistics import paired_difference
from llm_attribution.workflows.lds import lds_measurements
from llm_attribution.workflows.replay import open_replay
from llm_attribution.workflows.runs import open_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    loaded = open_run(args.run)
    measured = lds_measurements(args.run, loaded.config.train.seed)
    if measured is None:
        raise SystemExit(f"{args.run} has no LDS retrains for its seed: run `llm-attr lds` first")
    replay = open_replay(loaded)
    encoded = encode_examples(loaded.task.test, loaded.tokenizer, loaded.config.prompt)
    replayed = []
    for mask in progress(measured.masks, desc="masked replays", total=len(measured.masks)):
        params = replay.run(mask.to(torch.float32), desc="replay")
        with torch.no_grad():
            replayed.append(replay.test_losses(params, encoded).double().cpu())
    losses = torch.stack(replayed)  # [M, n_test]
    results = json.loads((args.run / "results.json").read_text())["methods"]
    table: dict[str, dict[str, object]] = {}
    per_test: dict[str, np.ndarray] = {}
    for name, entry in results.items():
        scores = read_scores(args.run / entry["scores"]).double()
        per_test[name] = lds_per_test(scores, measured.masks, losses)
        table[name] = {
            "retrained": float(np.nanmean(lds_per_test(scores, measured.masks, measured.attributed))),
            "masked_replay": float(np.nanmean(per_test[name])),
            "masked_replay_per_test": [None if np.isnan(v) else float(v) for v in per_test[name]],
        }
    # how alike the two counterfactuals are: per test example, Spearman of their losses over subsets
    alike = float(np.nanmean(spearman_rows(losses.T.numpy(), measured.attributed.double().T.numpy())))
    print(f"{'method':<14} {'LDS, retrained':>15} {'LDS, masked replay':>19}")
    for name, row in table.items():
        print(f"{name:<14} {row['retrained']:>15.3f} {row['masked_replay']:>19.3f}")
    best = max(per_test, key=lambda name: float(np.nanmean(per_test[name])))
    print(f"paired on the same test examples (masked replay), {best} minus each:")
    for name in table:
        if name != best:
            d = paired_difference(per_test[best], per_test[name])
            print(f"  {best} - {name:<14} {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
    ended = replay.saved_difference
    print(f"subsets: {len(measured.masks)}; replay ended {ended:.1e} (relative) from the saved adapter")
    print(f"per-test Spearman between retrained and masked-replay losses over subsets: {alike:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"methods": table, "losses_agree": alike}, indent=1) + "\n")


if __name__ == "__main__":
    main()
