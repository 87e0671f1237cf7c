#!/usr/bin/env bash
# The study's grid on the embedded model with every method the tool has (issue 15), in the settings of
# docs/results/study-embedded.md: 7 tasks x seeds 0,1,2, at most 300 training / 100 test examples, max
# length 64, 3 epochs. Two single-threaded streams share the tasks (one per core of a 2-core machine);
# each cell is an ordinary run, reused when rerun, so a killed grid resumes with its next unfinished cell.
# The last step judges every complete cell into OUT/study.json and prints the table.
#
#   bash scripts/study_every_method.sh OUT [KEEP]
#
# The grid is longer than one session on 2 cores, and run folders do not outlive a machine. Every finished
# cell keeps its judged record, OUT/<task>/seed-<s>/cell.json (per-test metrics of every method, a few
# hundred kB): KEEP (a folder in the repository) receives those records, and the next start copies them
# back, so cells finished in an earlier session count as done. `llm-attr study --judge-only --out KEEP`
# with the options below judges the kept cells alone, to the numbers their scores give.
#
# MAGIC is left out: one replay of the whole fine-tuning run per test example (155 s for 26 steps on
# 2 cores, docs/results/ground-truth-embedded.md) is at least 100 x 155 s = 4.3 hours per cell of 100 test
# examples, before a 300-example run's longer trajectory.
set -euo pipefail
out=${1:?usage: scripts/study_every_method.sh OUT [KEEP]}
keep=${2:-}
bin=${BIN:-.venv/bin}
methods=${METHODS:-hessian-free,grad-cosine,datainf,lissa,lissa-study,exact,eshampoo,kfac,ekfac,astra,tracin,less,trackstar,repsim,rept,knn-shapley,bm25}
# ASTRA is capped at 50 conjugate-gradient iterations: each is a pass over every training gradient for
# every test row, and its default 500 left 12 to 38 of 120 blocks unconverged even at 100 training examples
# (docs/results/ground-truth-embedded.md). Its rows say how many blocks the cap left unconverged. Every
# cell of one grid must use the same options (a kept record is checked against them).
options=${METHOD_OPTIONS:-astra.iterations=50}
common=(--seeds 0,1,2 --data-root "${SHARED:-../shared}/data/paper-datasets" --model embedded --epochs 3
    --max-length 64 --train-limit 300 --test-limit 100 --methods "$methods" --method-options "$options" --out "$out")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$out"
# cell.json files only, in their <task>/seed-<s> folders; the newer copy wins
sync_cells() {
    local from=$1 to=$2 cell
    while IFS= read -r -d '' cell; do
        mkdir -p "$to/$(dirname "$cell")" && cp -pu "$from/$cell" "$to/$cell"
    done < <(cd "$from" && find . -name cell.json -print0)
}
if [ -n "$keep" ] && [ -d "$keep" ]; then sync_cells "$keep" "$out"; fi
"$bin/llm-attr" study --tasks "${STREAM_A:-grammars,math,backdoor,mixedS}" "${common[@]}" --quiet >"$out/stream-a.log" 2>&1 &
a=$!
"$bin/llm-attr" study --tasks "${STREAM_B:-emotion,multibackdoor,mixedM}" "${common[@]}" --quiet >"$out/stream-b.log" 2>&1 &
b=$!
# a cell's record is kept as soon as it exists, so a session stopped mid-grid loses only unfinished cells
if [ -n "$keep" ]; then
    mkdir -p "$keep"
    while kill -0 "$a" 2>/dev/null || kill -0 "$b" 2>/dev/null; do sync_cells "$out" "$keep"; sleep 60; done &
fi
failed=0
wait "$a" || failed=1
wait "$b" || failed=1
[ -z "$keep" ] || sync_cells "$out" "$keep"
"$bin/llm-attr" study --judge-only --tasks mixedS,mixedM,emotion,grammars,math,backdoor,multibackdoor "${common[@]}"
[ "$failed" = 0 ] || { echo "a stream failed: see $out/stream-*.log" >&2; exit 1; }
