#!/usr/bin/env bash
# Long GPU work on a lent machine, across device calls of at most 10 minutes each. `start STAGES...` installs
# .whl/ (scripts/device_wheels.sh) and launches scripts/gpu_stages.sh STAGES... in its own process session (it
# outlives the call) from a copy of the repository, results and artifacts under /tmp/cfmoe; `launch CMD...` does the
# same for any command run from that copy (it writes its tables under $CFMOE_RESULTS, /tmp/cfmoe/results). `poll
# SECONDS` waits until the work ends or SECONDS pass, prints the log's tail and packs the results so far and the log
# into $OUT/results.tgz. Then, here: tar xzf <files_at>/results.tgz -C /tmp, and copy /tmp/results/* over results/.
#   first call (carry [".whl"]):  scripts/device_chain.sh start base_model fine_tuning+beyond_cfmoe+ecr_wikitext &&
#                                 scripts/device_chain.sh poll 480
#   or (carry [".whl", "artifacts/cpu/paper_scale"]):
#                                 scripts/device_chain.sh launch python3 scripts/paper_scale.py measure --grid host
#                                 --store /dev/shm/store.safetensors && ... poll 560
#   later calls:                  scripts/device_chain.sh poll 560
# Start long work this way, not inline: on 2026-12-07 a paper-scale run started inline in a device command
# (`a && b && setsid nohup cmd &`) ended, without an error, when its first call returned (cause not found), while
# earlier gpu chains launched like this ran on across calls. tests/test_scripts.py checks the session and the packing.
set -euo pipefail
WORK="${CFMOE_DEVICE_WORK:-/tmp/cfmoe}"
# alive and not a zombie (where nothing reaps the orphaned work, an ended one stays in the process table)
running() { [ -f "$WORK/pid" ] && kill -0 "$(cat "$WORK/pid")" 2>/dev/null \
  && ! grep -q '^State:[[:space:]]*Z' "/proc/$(cat "$WORK/pid")/status" 2>/dev/null; }
case "${1:-}" in
  start|launch)
    verb="$1"; shift
    [ "$#" -gt 0 ] || { echo "scripts/device_chain.sh: error: $verb needs $( [ "$verb" = start ] && echo "stages, e.g. base_model fine_tuning" || echo "a command, e.g. python3 scripts/paper_scale.py measure")" >&2; exit 2; }
    [ "$verb" = start ] && set -- scripts/gpu_stages.sh "$@"
    if running; then echo "scripts/device_chain.sh: error: work is already running (pid $(cat "$WORK/pid"))" >&2; exit 2; fi
    cd "$(dirname "$0")/.."
    mkdir -p "$WORK"
    if compgen -G ".whl/*.whl" > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
    fi
    rm -rf "$WORK/repo" && cp -r . "$WORK/repo" && cd "$WORK/repo"
    PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" CFMOE_RESULTS="$WORK/results" CFMOE_ARTIFACTS="$WORK/artifacts" \
      PYTHONUNBUFFERED=1 setsid nohup "$@" > "$WORK/log" 2>&1 < /dev/null &
    echo $! > "$WORK/pid"
    echo "started $* (pid $(cat "$WORK/pid"), session $(ps -o sid= -p "$(cat "$WORK/pid")" | tr -d ' '), log $WORK/log)"
    ;;
  poll)
    limit="${2:-480}"
    [[ "$limit" =~ ^[0-9]+$ ]] || { echo "scripts/device_chain.sh: error: poll needs seconds, got '$limit'" >&2; exit 2; }
    [ -f "$WORK/pid" ] || { echo "scripts/device_chain.sh: error: nothing started in $WORK (a fresh machine?)" >&2; exit 2; }
    started=$(date +%s)
    while running && [ $(( $(date +%s) - started )) -lt "$limit" ]; do sleep 5; done
    if running; then echo "[chain] still running after ${limit}s"; else echo "[chain] not running (ended)"; fi
    grep -v "Loading weights\|it/s]\|^{'" "$WORK/log" | tail -n 25 || true
    if [ -n "${OUT:-}" ]; then
      tar czf "$OUT/results.tgz" -C "$WORK" log $( [ -d "$WORK/results" ] && echo results )
    fi
    ;;
  *) echo "scripts/device_chain.sh: error: use 'start STAGES...', 'launch CMD...' or 'poll SECONDS'" >&2; exit 2 ;;
esac
