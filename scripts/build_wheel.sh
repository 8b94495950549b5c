#!/usr/bin/env bash
# Builds a regops wheel with the CUDA extension for the GPUs you run:
#   bash scripts/build_wheel.sh [OUT_DIR]            (default OUT_DIR: dist/)
#   TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" bash scripts/build_wheel.sh   to choose the targets
# Needs nvcc (CUDA toolkit) and builds against the torch of the project environment (scripts/env.sh). The wheel's
# version names its variant (e.g. 0.1.0+cu130.torch2.14); regops/_build_info.json inside it records torch, CUDA,
# architectures and git revision, and `python -m regops.info` reports them wherever the wheel is installed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out="${1:-dist}"
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
REGOPS_BUILD_EXT=1 python -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$tmp" .
wheel="$(ls "$tmp"/regops-*.whl)"
mv "$wheel" "$out/"
wheel="$out/$(basename "$wheel")"
echo "built $wheel for $TORCH_CUDA_ARCH_LIST"
python - "$wheel" <<'PY'
import json, os, shutil, subprocess, sys, tempfile, zipfile
import triton

wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as d:
    so = next(n for n in z.namelist() if n.startswith("regops/_C") and n.endswith(".so"))
    print("build info:", json.loads(z.read("regops/_build_info.json")))
    path = z.extract(so, d)
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    for flag in ("--list-elf", "--list-ptx"):
        print(subprocess.run([tool, flag, path], capture_output=True, text=True).stdout.strip())
PY
