#!/usr/bin/env bash
# The gpu chain on a lent GPU machine, across device calls of at most 10 minutes each. `start STAGES...` installs
# .whl/ (scripts/device_wheels.sh) and launches scripts/gpu_stages.sh STAGES... in its own process session (it
# outlives the call) from a copy of the repository, results and artifacts under /tmp/cfmoe. `poll SECONDS` waits
# until the chain ends or SECONDS pass, prints the log's tail and packs the results so far and the log into
# $OUT/results.tgz. Then, here: tar xzf <files_at>/results.tgz -C /tmp, and copy /tmp/results/* over results/.
#   first call (carry [".whl"]):  scripts/device_chain.sh start base_model fine_tuning+beyond_cfmoe+ecr_wikitext &&
#                                 scripts/device_chain.sh poll 480
#   later calls:                  scripts/device_chain.sh poll 560
set -euo pipefail
WORK="${CFMOE_DEVICE_WORK:-/tmp/cfmoe}"
running() { [ -f "$WORK/pid" ] && kill -0 "$(cat "$WORK/pid")" 2>/dev/null; }
case "${1:-}" in
  start)
    shift
    [ "$#" -gt 0 ] || { echo "scripts/device_chain.sh: error: start needs stages, e.g. base_model fine_tuning" >&2; exit 2; }
    if running; then echo "scripts/device_chain.sh: error: a chain is already running (pid $(cat "$WORK/pid"))" >&2; exit 2; fi
    cd "$(dirname "$0")/.."
    mkdir -p "$WORK"
    if compgen -G ".whl/*.whl" > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
    fi
    rm -rf "$WORK/repo" && cp -r . "$WORK/repo" && cd "$WORK/repo"
    PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" CFMOE_RESULTS="$WORK/results" CFMOE_ARTIFACTS="$WORK/artifacts" \
      setsid nohup scripts/gpu_stages.sh "$@" > "$WORK/log" 2>&1 < /dev/null &
    echo $! > "$WORK/pid"
    echo "started scripts/gpu_stages.sh $* (pid $(cat "$WORK/pid"), log $WORK/log)"
    ;;
  poll)
    limit="${2:-480}"
    [[ "$limit" =~ ^[0-9]+$ ]] || { echo "scripts/device_chain.sh: error: poll needs seconds, got '$limit'" >&2; exit 2; }
    [ -f "$WORK/pid" ] || { echo "scripts/device_chain.sh: error: no chain started in $WORK (a fresh machine?)" >&2; exit 2; }
    started=$(date +%s)
    while running && [ $(( $(date +%s) - started )) -lt "$limit" ]; do sleep 5; done
    if running; then echo "[chain] still running after ${limit}s"; else echo "[chain] not running (ended)"; fi
    grep -v "Loading weights\|it/s]\|^{'" "$WORK/log" | tail -n 25 || true
    if [ -n "${OUT:-}" ]; then
      tar czf "$OUT/results.tgz" -C "$WORK" log $( [ -d "$WORK/results" ] && echo results )
    fi
    ;;
  *) echo "scripts/device_chain.sh: error: use 'start STAGES...' or 'poll SECONDS'" >&2; exit 2 ;;
esac
