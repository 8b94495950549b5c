#!/usr/bin/env bash
# The whole test suite, in its own environment: bash scripts/test.sh [pytest args]
# Without a GPU, Triton kernels run under the interpreter on CPU tensors; `cuda`-marked tests need a GPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m ruff check .
python -m pytest -q "$@"
