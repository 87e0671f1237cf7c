#!/usr/bin/env bash
# The ground-truth runs of docs/results/ground-truth-embedded.md: for each task, a run of the embedded
# model (100 training / 20 test examples, max length 48, 2 epochs, lr 1e-3), then `llm-attr lds` with 32
# half-subsets and the noise-ceiling seed. Resumable: rerun the same command after a kill.
#
#   bash scripts/ground_truth.sh OUT [TASK ...]      # default tasks: grammars backdoor mixedS
#
# The study's datasets are read from $SHARED/data/paper-datasets (default: ../shared).
set -euo pipefail
out=${1:?usage: scripts/ground_truth.sh OUT [TASK ...]}
shift
tasks=("${@:-grammars backdoor mixedS}")
read -r -a tasks <<<"${tasks[*]}"
data=${SHARED:-../shared}/data/paper-datasets
bin=${BIN:-.venv/bin}
# METHODS / OPTIONS override the study's methods (e.g. every method the tool has, for issue 15's table).
methods=${METHODS:-hessian-free,datainf,lissa,lissa-study,exact,ekfac-example,repsim}
options=${OPTIONS:-lissa.depth=1000}
for task in "${tasks[@]}"; do
    run=$out/$task
    "$bin/llm-attr" run --task "$data/$task" --model embedded --train-limit 100 --test-limit 20 \
        --max-length 48 --epochs 2 --learning-rate 1e-3 --methods "$methods" --method-options "$options" \
        --out "$run" --quiet
    "$bin/llm-attr" lds --run "$run" --subsets "${SUBSETS:-32}" --methods "$methods" \
        --method-options "$options" --workers "${WORKERS:-1}" --quiet --json >"$run/lds-table.json"
    "$bin/llm-attr" lds --run "$run" --subsets "${SUBSETS:-32}" --methods "$methods" \
        --method-options "$options" --quiet
done
