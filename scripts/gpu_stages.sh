#!/usr/bin/env bash
# How the committed gpu results are produced on a GPU machine with no Jupyter: the notebooks' own stages,
# through `python -m cfmoe.stages`, into results/<notebook>/gpu/.
#   Usage: scripts/gpu_stages.sh base_model fine_tuning ecr_wikitext serving   (cache_management is CPU-bound)
set -euo pipefail
cd "$(dirname "$0")/.."
for stage in "$@"; do
  started=$(date +%s)
  python3 -m cfmoe.stages "$stage" --preset gpu
  echo "[done] $stage in $(( $(date +%s) - started ))s"
done
