"""Finding the CUDA toolkit and describing build targets; used by setup.py (loaded by path, before regops is
installed) and by the just-in-time build in regops/_jit.py. Standard library only."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


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
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    except OSError:
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
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=path, capture_output=True, text=True)
        if out.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def local_version(torch_version: str, torch_cuda: str) -> str:
    """The wheel variant, e.g. torch 2.14.1 with CUDA 13.0 -> 'cu130.torch2.14'."""
    major_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    return f"cu{torch_cuda.replace('.', '')}.torch{major_minor}"
