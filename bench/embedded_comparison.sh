#!/usr/bin/env bash
# Reproduces the README's results table on the embedded default: every tiny-synthetic run (GRAFF, its three
# ablations, the eight baselines) with seeds 0 and 1 and its run file's 5-minute budget, one run at a time on
# this machine's CPU, W&B offline under the results folder, then the analysis.
#   bash bench/embedded_comparison.sh [results_dir] [seeds...]        (about 11 minutes per run id and seed pair)
# Re-running it resumes: finished runs are skipped, an interrupted one continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-results/embedded}
shift || true
SEEDS=${*:-0 1}
METHODS=(proposed ablation-noedges ablation-nobudget ablation-frozenw comparative-1 comparative-2 comparative-3
         comparative-4 comparative-5 comparative-6 comparative-7 comparative-8)
mkdir -p "$RESULTS/logs"
for seed in $SEEDS; do
  for method in "${METHODS[@]}"; do
    id="$method-iter1-tiny-synthetic"
    [ "$seed" != 0 ] && id="$id-seed$seed"
    echo "$(date +%T) $id"
    uv run python -u -m src.main run="$id" results_dir="$RESULTS" mode=full wandb.mode=offline \
      >> "$RESULTS/logs/$id.log" 2>&1     # a finished run re-run says so and does not train again
  done
done
ids=$(printf '"%s-iter1-tiny-synthetic",' "${METHODS[@]}")
uv run python -m src.evaluate results_dir="$RESULTS" run_ids="[${ids%,}]"
