#!/usr/bin/env bash
# One entry point for a fresh machine: installs the kit into ./.venv (once), then runs a job.
#   bash scripts/run.sh demo     # the offline end-to-end demo (CPU; measured times in README.md)
#   bash scripts/run.sh test     # the test suite (offline)
#   bash scripts/run.sh ARGS...  # any echoink-lite command, e.g. `bash scripts/run.sh data check data/avqa/train`
# TORCH_SPEC overrides the torch requirement installed first (default torch==2.13.0: the CPU wheel on the
# project's machines; on a CUDA box pick the build for your driver). Installing torch first keeps pip from
# pulling a multi-GB CUDA build as a side effect of another package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
stamp="$VENV/.echoink-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
job=${1:-demo}
case "$job" in
  demo) shift || true; exec echoink-lite demo "$@" ;;
  test) shift || true; exec python -m pytest tests "$@" ;;
  *) exec echoink-lite "$@" ;;
esac
