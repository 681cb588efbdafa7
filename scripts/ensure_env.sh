# Sourced by run_all.sh and run_tests.sh: create or refresh the project's virtual environment.
# It is rebuilt only when pyproject.toml changed since it was filled (stamp = the file's sha256).
VENV="${CFMOE_VENV:-$PWD/.venv}"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.cfmoe-stamp" 2>/dev/null)" != "$want" ]; then
  echo "[env] filling $VENV (a few minutes, once)"
  started=$(date +%s)
  "$PYTHON_BIN" -m venv "$VENV"
  # torch==2.13.0 is pinned in pyproject.toml: a CPU build on local disk (unpinned torch pulls CUDA)
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[notebooks,test]"
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name cfmoe --display-name "cfmoe (.venv)" >/dev/null
  echo "$want" > "$VENV/.cfmoe-stamp"
  echo "[env] ready in $(( $(date +%s) - started ))s"
fi
export PATH="$VENV/bin:$PATH"
# reproducibility: fixed hashing, no tokenizer threads, quiet progress bars in logs
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" \
       HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" TRANSFORMERS_NO_ADVISORY_WARNINGS=1 \
       HF_DATASETS_DISABLE_PROGRESS_BARS=1 MPLBACKEND=Agg
