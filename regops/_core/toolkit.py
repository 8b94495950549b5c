"""Finding the CUDA toolkit, the extension's sources and flags, and describing build targets; used by setup.py
(loaded by path, before regops is installed) and by the just-in-time build in :mod:`regops._core.jit`. Standard
library only."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# Host compiler flags of the extension. No floating-point contraction: the CPU kernels must round exactly as the
# reference does (an a*b+c fused into one FMA rounds once, the reference twice), on every ISA clone. No errno from
# math functions (no kernel reads it; the values are the same): with it, a sqrt is a libm call on every element
# (to set errno on a negative input) and its loop cannot vectorize. GCC takes this only for a whole translation
# unit (the builtins' declarations are fixed at start-up: `#pragma GCC optimize` does not change them).
# OpenMP: at::parallel_for is a header template that runs its loop in parallel only in a translation unit compiled
# with OpenMP (torch's own parallel backend); without it every C++ CPU kernel runs on one thread. Linking it adds
# libgomp.so.1, the runtime torch has already loaded (torch's wheel ships it under that name): one runtime.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", *OPENMP_FLAGS]
LINK_FLAGS = [*OPENMP_FLAGS]
NVCC_FLAGS = ["-O3"]


def extension_sources(csrc: str, cuda: bool) -> list[str]:
    """The files compiled into regops._C: the module (csrc/module.cpp), every family's CPU kernels
    (csrc/<family>/cpu*.cpp) and C++ derivatives (csrc/<family>/autograd*.cpp) always; with ``cuda`` also the CUDA
    kernels (csrc/<family>/*.cu) and their bindings (csrc/<family>/cuda*.cpp). Object files are named after the
    sources' stems, so a family's .cu and .cpp files never share one."""
    families = lambda pattern: sorted(glob.glob(os.path.join(csrc, "*", pattern)))
    cpu = [os.path.join(csrc, "module.cpp"), *families("cpu*.cpp"), *families("autograd*.cpp")]
    if not cuda:
        return cpu
    return cpu + families("cuda*.cpp") + families("*.cu")


SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")


def sources_hash(csrc: str, flags: list[str]) -> str:
    """A short hash of every source and header under ``csrc`` and the build flags: what a build was made from
    (recorded in its build info; the just-in-time cache key)."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True)):
        if os.path.splitext(path)[1] in SOURCE_SUFFIXES:
            digest.update(os.path.relpath(path, csrc).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    digest.update("\0".join(flags).encode())
    return digest.hexdigest()[:16]


def csrc_hash(csrc: str) -> str:
    """The hash of the extension's sources alone (no flags): recorded in the build info of every build, so a test
    can tell an extension built from older sources than the checkout's."""
    return sources_hash(csrc, [])


def is_toolkit(root: str | None) -> bool:
    return (
        bool(root)
        and os.path.isfile(os.path.join(root, "bin", "nvcc"))
        and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))
    )


def find_cuda_home() -> str | None:
    """The real CUDA toolkit root, or None.

    torch guesses the root from the nvcc on PATH, which is wrong when that nvcc is a wrapper script (e.g.
    /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc). Order: CUDA_HOME / CUDA_PATH, the directory
    nvcc reports it runs from (``nvcc --dryrun`` prints ``_HERE_``), the resolved nvcc path, /usr/local/cuda*.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit(os.environ.get(var)):
            return os.environ[var]
    candidates: list[str] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True,
                text=True,
                timeout=60,
            )
            match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if match:
                candidates.append(os.path.dirname(match.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c for c in candidates if is_toolkit(c)), None)


def nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else None


def cuda_archs(arch_list: str) -> list[str]:
    """'8.0;9.0+PTX' -> ['sm_80', 'sm_90', 'compute_90']: the cubins and PTX a fat binary will hold."""
    archs = []
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        if not item:
            continue
        number = item.removesuffix("+PTX").replace(".", "")
        archs.append(f"sm_{number}")
        if item.endswith("+PTX"):
            archs.append(f"compute_{number}")
    return archs


def default_jobs() -> int:
    """Parallel compile jobs: one per core, at most one per ~3 GB of memory (nvcc is memory-hungry)."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    return max(1, min(cores, int(mem_gb // 3)))


def git_revision(path: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=path, capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def torch_minor(torch_version: str) -> tuple[int, int]:
    """'2.14.1+cu130' -> (2, 14)."""
    major, minor = re.match(r"(\d+)\.(\d+)", torch_version).groups()
    return int(major), int(minor)


def local_version(torch_version: str, torch_cuda: str | None) -> str:
    """The wheel variant: torch 2.14.1 with CUDA 13.0 kernels -> 'cu130.torch2.14'; CPU kernels only -> 'cpu.torch2.14'.

    The torch part is the minor release: torch keeps its C++ ABI across the patch releases of one minor release
    (patch releases fix bugs; the ABI changes between minor releases), which is also what the load-time guard
    (regops._core.extension.torch_mismatch) and the declared requirement (:func:`torch_requirement`) check.
    """
    major, minor = torch_minor(torch_version)
    variant = f"cu{torch_cuda.replace('.', '')}" if torch_cuda else "cpu"
    return f"{variant}.torch{major}.{minor}"


def torch_requirement(torch_version: str) -> str:
    """The torch an extension built against ``torch_version`` loads into: the same minor release."""
    major, minor = torch_minor(torch_version)
    return f"torch>={major}.{minor},<{major}.{minor + 1}"
