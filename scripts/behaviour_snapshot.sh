#!/usr/bin/env bash
# Runs every path a refactor must leave unchanged into OUT, for scripts/compare_runs.py:
# the tiny run of every registered method in memory, with --stream, in bf16 products, under torchrun
# with 2 processes, `explain --json`, a two-seed `study`, and (unless SKIP_DEMO=1) `make demo`'s run.
#   bash scripts/behaviour_snapshot.sh /tmp/before   # on the old commit
#   bash scripts/behaviour_snapshot.sh /tmp/after    # on the new one
#   .venv/bin/python scripts/compare_runs.py /tmp/before /tmp/after
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: behaviour_snapshot.sh OUT}
mkdir -p "$out"
bin=.venv/bin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} LLM_ATTR_QUIET=1
methods=$($bin/python -c "from llm_attribution.attribution import available_methods; print(','.join(available_methods()))")
echo "$methods" > "$out/methods.txt"
tiny=(--task grammars --model tiny --train-limit 60 --test-limit 10 --epochs 2 --quiet --methods "$methods")
$bin/llm-attr run "${tiny[@]}" --out "$out/memory"
$bin/llm-attr run "${tiny[@]}" --stream true --out "$out/stream"
bf16=$(echo "$methods" | tr ',' '\n' | sed 's/$/.product_dtype=bfloat16/' | paste -sd, -)
$bin/llm-attr run "${tiny[@]}" --method-options "$bf16" --out "$out/bf16"
$bin/python -m torch.distributed.run --standalone --nproc-per-node 2 -m llm_attribution run "${tiny[@]}" \
  --out "$out/torchrun"
$bin/llm-attr explain --run "$out/memory" --prompt "Rewrite in the past tense: the cat sits" \
  --response "the cat sat" --methods "$methods" --top 60 --json --quiet > "$out/explain.json"
# --data-root names no folder, so "grammars" is the built-in task wherever the script runs
$bin/llm-attr study --tasks grammars --data-root "$out/no-data-root" --seeds 0,1 --model tiny --train-limit 40 --test-limit 8 --epochs 1 \
  --methods hessian-free,datainf,repsim --quiet --out "$out/study" > /dev/null
if [ "${SKIP_DEMO:-0}" != 1 ]; then
  make demo DEMO_RUN="$out/demo" > "$out/demo.log"
fi
echo "snapshot in $out"
