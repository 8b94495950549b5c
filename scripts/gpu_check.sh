#!/usr/bin/env bash
# One command for a machine with a GPU: build what is needed, run the GPU tests, compare every op on CUDA tensors
# under each backend with the CPU reference, run the quick benchmarks, and write a summary plus
# benchmarks/results/<gpu>/. Works offline with a preinstalled torch and triton (regops is installed without
# dependencies). Aimed at under 6 minutes on an H100/H200, setup included.
#
#   bash scripts/gpu_check.sh              # on a GPU machine
#   bash scripts/gpu_check.sh --dry-run    # anywhere: the same comparisons under the Triton interpreter, small shapes
#   options: --skip-build  --skip-bench  --skip-tests
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The README's environment (made by scripts/test.sh or bench.sh) when it exists, else $PYTHON or the python on PATH
# (a GPU machine with torch and triton preinstalled: regops is installed there without dependencies).
VENV="${REGOPS_VENV:-$ROOT/.venv}"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$VENV/bin/python" ]]; then
  PY="$VENV/bin/python"
  export PATH="$VENV/bin:$PATH"
else
  PY=python
fi

DRY=0 BUILD=1 BENCH=1 TESTS=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --skip-build) BUILD=0 ;;
    --skip-bench) BENCH=0 ;;
    --skip-tests) TESTS=0 ;;
    *) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

if [[ $DRY == 1 ]]; then
  # CI: no GPU, no build, no benchmarks; the comparisons of gpu_check.py on CPU tensors under the interpreter.
  export TRITON_INTERPRET=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PY" scripts/gpu_check.py --device cpu --small
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA GPU visible to torch; use --dry-run" >&2
  exit 2
fi
GPU="$("$PY" -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-'))")"
OUT="benchmarks/results/$GPU"
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_check_summary.md"
START=$SECONDS
declare -a STEPS=()
status=0

step() {  # step NAME COMMAND...: run, time, record
  local name="$1"; shift
  local t0=$SECONDS
  echo "=== $name"
  if "$@" 2>&1 | tee "$OUT/gpu_check_${name// /_}.log"; then
    STEPS+=("| $name | ok | $((SECONDS - t0)) s |")
  else
    STEPS+=("| $name | FAILED | $((SECONDS - t0)) s |"); status=1
  fi
}

if [[ $BUILD == 1 ]]; then
  # The extension for this GPU's architecture only (fast); without nvcc the install is pure Python + Triton.
  ARCH="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")"
  step "install" env TORCH_CUDA_ARCH_LIST="$ARCH" "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . -q
fi
"$PY" -m regops.info | tee "$OUT/gpu_check_info.txt"
if [[ $TESTS == 1 ]]; then
  # every test with a CUDA parametrization (the kernels of every family on CUDA tensors against the reference) or
  # the `cuda` marker: -k matches both
  step "cuda tests" "$PY" -m pytest tests -q -k cuda -p no:cacheprovider
fi
step "comparisons" "$PY" scripts/gpu_check.py --device cuda --json "$OUT/gpu_check.json"
if [[ $BENCH == 1 ]]; then
  step "benchmarks" "$PY" -m benchmarks --quick
fi

{
  echo "# gpu_check on $("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
  echo
  "$PY" -c "import torch, triton; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}, {torch.cuda.device_count()} GPU(s)')"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${STEPS[@]}"
  echo
  echo "Total: $((SECONDS - START)) s. Logs: $OUT/gpu_check_*.log; comparisons: $OUT/gpu_check.json"
} > "$SUMMARY"
cat "$SUMMARY"
exit $status
