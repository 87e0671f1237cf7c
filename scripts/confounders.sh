#!/usr/bin/env bash
# The study's confounders, one change at a time against our defaults, on the study's grammars with the
# embedded model (docs/results/ground-truth-embedded.md, "Confounders"): which of them moves the methods'
# accuracy and coverage toward the study's 7B figures (Hessian-free 0.14 / 0.126, DataInf 0.39 / 0.244)?
#
#   bash scripts/confounders.sh OUT        # resumable: a rerun reuses every finished run
#
# The study's datasets are read from $SHARED/data/paper-datasets (default: ../shared).
set -euo pipefail
out=${1:?usage: scripts/confounders.sh OUT}
data=${SHARED:-../shared}/data/paper-datasets/grammars
bin=${BIN:-.venv/bin}
base=(--task "$data" --model embedded --train-limit 100 --test-limit 50 --max-length 48 --epochs 2
      --learning-rate 1e-3 --methods hessian-free,datainf,exact,ekfac-example,repsim --quiet)
declare -A changes=(
    [ours]=""
    [max-length-128]="--max-length 128"
    [study-padding-128]="--max-length 128 --padding study"
    [study-optimisation]="--epochs 10 --learning-rate 5e-5 --batch-size 24"
    [train-300]="--train-limit 300"
    # at 48 tokens some grammars prompts leave no response token, so the response-only loss is compared at
    # 128, against max-length-128
    [loss-on-response-128]="--max-length 128 --loss-on response"
)
for name in ours max-length-128 study-padding-128 study-optimisation train-300 loss-on-response-128; do
    # shellcheck disable=SC2086  # the change is a list of options
    "$bin/llm-attr" run "${base[@]}" ${changes[$name]} --out "$out/$name" >/dev/null
done
"$bin/python" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
names = ["ours", "max-length-128", "study-padding-128", "study-optimisation", "train-300", "loss-on-response-128"]
methods = json.loads((out / "ours" / "results.json").read_text())["methods"]
print("| change | " + " | ".join(f"{m} acc / cov" for m in methods) + " |")
print("|---|" + "---|" * len(methods))
for name in names:
    found = json.loads((out / name / "results.json").read_text())["methods"]
    cells = [f"{found[m]['accuracy']:.3f} / {found[m]['coverage']:.3f}" for m in methods]
    print(f"| {name} | " + " | ".join(cells) + " |")
PY
