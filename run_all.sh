#!/usr/bin/env bash
# Run the whole study: every notebooks/NN_*.ipynb in order with papermill, results under results/.
#   ./run_all.sh [--preset cpu|gpu|smoke|FILE.yaml] [--model PATH_OR_HUB_ID] [--force]
set -euo pipefail
cd "$(dirname "$0")"
preset=cpu model="" force=False
while [ $# -gt 0 ]; do
  case "$1" in
    --preset|--model)
      [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || {
        echo "run_all.sh: $1 needs a value; e.g. $1 $([ "$1" = --preset ] && echo cpu || echo /path/to/checkpoint)" >&2; exit 2; }
      if [ "$1" = --preset ]; then preset="$2"; else model="$2"; fi; shift 2 ;;
    --force) force=True; shift ;;
    -h|--help) sed -n 2,3p "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1'; valid: --preset NAME, --model PATH, --force" >&2; exit 2 ;;
  esac
done
case "$preset" in
  smoke|cpu|gpu) params="params/$preset.yaml" ;;
  *.yaml|*.yml) [ -f "$preset" ] || { echo "run_all.sh: preset file '$preset' does not exist" >&2; exit 2; }
                params="$preset"; preset="$(realpath "$preset")" ;;
  *) echo "run_all.sh: unknown preset '$preset'; valid presets are smoke, cpu, gpu or a .yaml file" >&2; exit 2 ;;
esac
source scripts/ensure_env.sh
# the preset's ranges and names, and the model path, checked before any notebook runs (one line on error)
python -m cfmoe.stages check --preset "$preset" ${model:+--model-path "$model"} > /dev/null

tag="$(basename "$params" .yaml)${model:+-$(echo "$model" | tr '/ ' '__')}"
executed="results/executed/$tag"
mkdir -p "$executed"
# A stage re-runs when its notebook, the package, the preset, the data or the model changed,
# or when an earlier stage re-ran (its outputs are this stage's inputs).
inputs_hash() {
  { cat "$1" "$params" pyproject.toml $(find cfmoe -name "*.py" | sort) data/wikitext-2/*; echo "model=$model"; } | sha256sum | cut -d' ' -f1
}
rerun_rest=$force
total_started=$(date +%s)
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  name="$(basename "$nb" .ipynb)"
  stamp="$executed/$name.inputs"
  want="$(inputs_hash "$nb")"
  if [ "$rerun_rest" = False ] && [ -f "$executed/$name.ipynb" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "[skip] $name (inputs unchanged; --force to re-run)"
    continue
  fi
  rerun_rest=True
  started=$(date +%s)
  echo "[run ] $name ..."
  partial="$executed/.$name.partial.ipynb"
  if ! papermill "$nb" "$partial" --cwd notebooks --no-progress-bar --log-level WARNING \
       -p preset "$preset" -p model_path "$model" -p force "$force"; then
    cell="$(python -m cfmoe.present.notebooks failed-cell "$partial" 2>/dev/null || echo '?')"
    echo "[FAIL] $name: $cell; the partial notebook is $partial" >&2
    exit 1
  fi
  mv "$partial" "$executed/$name.ipynb"
  echo "$want" > "$stamp"
  echo "[done] $name in $(( $(date +%s) - started ))s"
  python -m cfmoe.present.notebooks record-time "$tag" "$name" "$(( $(date +%s) - started ))"  # results/chain/
done
python -m cfmoe.present.report > /dev/null  # results/summary.md: the headline table, from the tables above
# the committed study's executed notebooks, for readers (this machine's paths stripped)
[ "$tag" = cpu ] && python -m cfmoe.present.notebooks publish "$executed" results/notebooks
echo "[all ] study finished in $(( $(date +%s) - total_started ))s; results under results/"
