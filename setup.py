"""Builds the optional CUDA extension regops._C; everything else is declared in pyproject.toml.

REGOPS_BUILD_EXT=auto (default): build when torch is a CUDA build and a CUDA toolkit (nvcc) is found;
REGOPS_BUILD_EXT=1: fail if it cannot be built; REGOPS_BUILD_EXT=0: never build (pure Python + Triton).
TORCH_CUDA_ARCH_LIST picks the targets (default "8.0;8.6;8.9;9.0+PTX"). The build needs torch importable
(pip install --no-build-isolation).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
MODE = os.environ.get("REGOPS_BUILD_EXT", "auto").strip().lower()
HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"regops setup: {msg}", file=sys.stderr)


def _skip(reason: str) -> list:
    if MODE == "1":
        raise RuntimeError(f"REGOPS_BUILD_EXT=1 but the CUDA extension cannot be built: {reason}")
    _log(f"building without the CUDA extension ({reason}); GPU ops will use Triton")
    return []


def _is_toolkit(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The real CUDA toolkit root. torch guesses it from the nvcc on PATH, which is wrong when that nvcc is
    a wrapper script (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # nvcc reports the directory it really runs from
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60,
            )
            match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if match:
                candidates.insert(0, os.path.dirname(match.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c for c in candidates if _is_toolkit(c)), None)


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE, capture_output=True, text=True)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return None


def cuda_archs(arch_list: str) -> list[str]:
    """'8.0;9.0+PTX' -> ['sm_80', 'sm_90', 'compute_90'] (what the fat binary will hold)."""
    archs = []
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        number = item.removesuffix("+PTX").replace(".", "")
        archs.append(f"sm_{number}")
        if ptx:
            archs.append(f"compute_{number}")
    return archs


def _default_jobs() -> int:
    """Parallel compile jobs: one per core, but at most one per ~3 GB of memory (nvcc is memory-hungry)."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8
    return max(1, min(cores, int(mem_gb // 3)))


def extensions():
    if MODE in ("0", "false", "no", "off"):
        return [], {}
    try:
        import torch
    except ImportError:
        return _skip("torch is not importable in the build environment (use pip install --no-build-isolation)"), {}
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is not a CUDA build"), {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return _skip("no CUDA toolkit (nvcc) found; set CUDA_HOME"), {}
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(_default_jobs()))
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    info = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_version": _nvcc_version(cuda_home),
        "cuda_home": cuda_home,
        "arch_list": arch_list,
        "cuda_archs": cuda_archs(arch_list),
        "git_revision": _git_revision(),
    }
    _log(f"building regops._C with CUDA {info['cuda_version']} at {cuda_home} for {arch_list}")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    ext = cpp_extension.CUDAExtension(
        "regops._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        py_limited_api=False,
    )

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            super().run()
            # Beside the built library: the source tree for in-place/editable builds, build_lib for wheels.
            out_dir = os.path.dirname(self.get_ext_fullpath("regops._C"))
            with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                json.dump(info, f, indent=1)

    return [ext], {"build_ext": BuildExt}


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
        match = re.search(r"release (\d+\.\d+)", out.stdout)
        return match.group(1) if match else None
    except OSError:
        return None


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
