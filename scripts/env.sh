#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and installs regops into it, editable, with the
# test, benchmark and peer-library extras. Sourced by scripts/test.sh and scripts/bench.sh.
#   REGOPS_VENV   where the environment lives (default: .venv in the repository)
#   PYTHON        the interpreter that creates it (default: python3)
#   REGOPS_BUILD_EXT=auto|0|1|cpu   build regops._C (auto: C++ CPU kernels with any compiler, CUDA kernels too
#                                   when nvcc and a CUDA torch exist)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${REGOPS_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "regops: creating $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi

# Reinstall only when what the install depends on has changed (or a previous install did not finish).
stamp="$VENV/.regops-install-stamp"
want="$(cat pyproject.toml setup.py regops/_cuda_toolkit.py csrc/* scripts/env.sh 2>/dev/null | sha256sum | cut -d' ' -f1)-${REGOPS_BUILD_EXT:-auto}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import regops" 2>/dev/null; then
  echo "regops: installing torch and regops[test,bench,peers] into $VENV" >&2
  # torch first: the extension builds against the environment's torch (no build isolation).
  "$PY" -m pip install -q --disable-pip-version-check "torch>=2.6" numpy setuptools wheel
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,bench,peers]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
