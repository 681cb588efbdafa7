#!/usr/bin/env bash
# Every test: the package's pytest suite and nbval over every notebook (smoke preset, as saved).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_env.sh
exec python -m pytest tests notebooks --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg -q "$@"
