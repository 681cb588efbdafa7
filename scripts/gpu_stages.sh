#!/usr/bin/env bash
# How the committed gpu results are produced on a GPU machine with no Jupyter: the notebooks' own stages,
# through `python -m cfmoe.stages`, into results/<notebook>/gpu/ (or $CFMOE_RESULTS).
#   Usage: scripts/gpu_stages.sh base_model fine_tuning ecr_wikitext serving   (cache_management is CPU-bound)
# Stages joined by '+' run side by side: `fine_tuning+beyond_cfmoe+ecr_wikitext` starts notebooks 06 and 04 with
# notebook 02, and they take each seed's models as notebook 02 saves them ($CFMOE_WAIT_FOR_RUNS, default an hour; start
# from an empty artifacts/gpu/finetune/). A group fails if any of its stages fails.
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${CFMOE_PRESET:-gpu}"
for group in "$@"; do
  started=$(date +%s)
  echo "[run ] $group (at $(date +%T))"
  IFS=+ read -ra stages <<< "$group"
  if [ "${#stages[@]}" -eq 1 ]; then
    python3 -m cfmoe.stages "$group" --preset "$preset"
  else
    pids=()
    for stage in "${stages[@]}"; do
      CFMOE_WAIT_FOR_RUNS="${CFMOE_WAIT_FOR_RUNS:-3600}" python3 -m cfmoe.stages "$stage" --preset "$preset" &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
  fi
  echo "[done] $group in $(( $(date +%s) - started ))s (at $(date +%T))"
done
