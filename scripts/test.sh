#!/usr/bin/env bash
# The whole test suite, in its own environment: bash scripts/test.sh [--latest] [pytest args]
#   --latest   against the newest releases of every dependency (environment .venv-latest) instead of the lock
# Without a GPU, Triton kernels run under the interpreter on CPU tensors; `cuda`-marked tests need a GPU.
set -euo pipefail
if [ "${1:-}" = "--latest" ]; then
  export REGOPS_LATEST=1
  shift
fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m ruff check .
python -m pytest -q "$@"
