#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and installs regops into it, editable, with the
# test, benchmark, peer-library and docs extras, at the versions of constraints/lock.txt (the versions the suite was last
# run with, so a new release on the registry cannot change what main tests). Sourced by scripts/test.sh, bench.sh
# docs.sh and gpu_check.sh.
#   REGOPS_VENV     where the environment lives (default: .venv in the repository; .venv-latest with REGOPS_LATEST=1)
#   REGOPS_LATEST=1 the newest releases instead of the lock (scripts/test.sh --latest), in their own environment
#   PYTHON          the interpreter that creates it (default: python3)
#   REGOPS_BUILD_EXT=auto|0|1|cpu   build regops._C (auto: C++ CPU kernels with any compiler, CUDA kernels too
#                                   when nvcc and a CUDA torch exist)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOCK="$ROOT/constraints/lock.txt"
if [ "${REGOPS_LATEST:-0}" = "1" ]; then
  VENV="${REGOPS_VENV:-$ROOT/.venv-latest}"
  PINS=(--upgrade --upgrade-strategy eager)
else
  VENV="${REGOPS_VENV:-$ROOT/.venv}"
  PINS=(-c "$LOCK")
fi
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "regops: creating $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi

# Reinstall only when what the install depends on has changed (or a previous install did not finish).
stamp="$VENV/.regops-install-stamp"
want="$(cat pyproject.toml setup.py regops/_core/toolkit.py "$LOCK" scripts/env.sh 2>/dev/null | sha256sum | cut -d' ' -f1)"
want="$want-$(find csrc -type f -print0 | sort -z | xargs -0 cat | sha256sum | cut -d' ' -f1)-${REGOPS_BUILD_EXT:-auto}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import regops" 2>/dev/null; then
  echo "regops: installing torch and regops[test,bench,peers,docs] into $VENV (${PINS[*]})" >&2
  # pip's log, without the lines about this machine's missing local indexes; the build's own lines stay visible.
  quiet() { grep -v -e "^WARNING: Location '" -e "^Requirement already satisfied" || true; }
  # torch first: the extension builds against the environment's torch (no build isolation).
  "$PY" -m pip install --disable-pip-version-check "${PINS[@]}" "torch>=2.6" numpy setuptools wheel 2>&1 | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "regops: installing torch failed" >&2; exit 1; }
  "$PY" -m pip install --disable-pip-version-check --no-build-isolation "${PINS[@]}" -e ".[test,bench,peers,docs]" 2>&1 \
    | quiet
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "regops: installing regops failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# One line that says what this environment runs: the extension's CPU and CUDA parts, or why they are missing.
python -c "from regops import info; print(info.summary())" >&2
# Where a C++ compiler exists the C++ CPU kernels must be there (tests/test_extension_present.py checks the same,
# and that they were built from these sources): an install that silently fell back to the reference stops here.
has_cxx() { [ -n "${CXX:-}" ] || command -v c++ >/dev/null || command -v g++ >/dev/null || command -v clang++ >/dev/null; }
if [ "${REGOPS_BUILD_EXT:-auto}" != "0" ] && [ "${REGOPS_EXT:-auto}" != "off" ] && has_cxx; then
  python -c "import sys, torch, regops; from regops._core import dispatch
sys.exit(dispatch.why_not('dropout', 'cpp', torch.device('cpu')) is not None)" \
    || { echo "regops: a C++ compiler is on PATH but regops._C has no C++ CPU kernels (see the build log above)" >&2; exit 1; }
fi
