"""Builds the optional extension regops._C; everything else is declared in pyproject.toml.

The extension has a CPU part (C++ kernels for CPU tensors: needs only a C++ compiler) and a CUDA part (needs
nvcc and a CUDA build of torch). REGOPS_BUILD_EXT picks what is built:

* ``auto`` (default): the CPU part whenever torch and a C++ compiler are found, plus the CUDA part when nvcc and a
  CUDA torch are found; a failing compile leaves a working pure-Python install (the reference runs on CPU,
  Triton on GPU) and says so;
* ``1``: fail unless everything available (CPU part, and CUDA part when torch is a CUDA build) is built;
* ``cpu``: the CPU part only; ``0``: nothing (pure Python + Triton).

TORCH_CUDA_ARCH_LIST picks the CUDA targets (default "8.0;8.6;8.9;9.0+PTX"). The extension is compiled against
the torch of the environment it is installed into: under pip's build isolation (plain ``pip install .``), where
that torch is hidden, setup.py finds it through the target interpreter. A build with the extension gets a local
version naming its variant (0.1.0+cu130.torch2.14, 0.1.0+cpu.torch2.14) unless REGOPS_LOCAL_VERSION=0, and
requires the torch minor release it was built against (the C++ ABI torch keeps within a minor release).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("REGOPS_BUILD_EXT", "auto").strip().lower()
BASE_REQUIRES = ["torch>=2.6", "numpy", "tqdm"]


def _load(name: str):
    """A module of the regops source tree, loaded by path: regops itself is not importable during its build."""
    path = os.path.join(HERE, "regops", "_core", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_regops_setup_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toolkit = _load("toolkit")
BASE_VERSION = re.search(r'__version__ = "([^"]+)"', open(os.path.join(HERE, "regops", "_version.py")).read())[1]


def _log(msg: str) -> None:
    # pip shows a build backend's output only with -v; a warning line is what a user may still see in logs.
    print(f"regops setup: {msg}", file=sys.stderr)


def _none(reason: str | None):
    if reason and MODE == "1":
        raise RuntimeError(f"REGOPS_BUILD_EXT=1 but the extension cannot be built: {reason}")
    if reason:
        _log(f"WARNING: building without the extension regops._C ({reason}); CPU ops run the reference, GPU ops Triton")
    # No _build_info.json either: it is written by the extension build only (never package data), so a pure
    # wheel or sdist made after an extension build in the same checkout does not ship a stale one.
    return [], {}, BASE_VERSION, BASE_REQUIRES


def _import_target_torch():
    """torch, importing it from the target environment when build isolation hides it (plain ``pip install .``)."""
    try:
        import torch

        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    site_dir = out.stdout.strip().splitlines()[-1]
    _log(f"torch is hidden by build isolation; building against the environment's torch in {site_dir}")
    # Appended, so the isolated build tools keep precedence; only torch (and what it imports) comes from there.
    sys.path.append(site_dir)
    try:
        import torch

        return torch
    except ImportError:
        return None


def _find_cxx() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


def extensions():
    if MODE in ("0", "false", "no", "off"):
        return _none(None)
    if MODE not in ("auto", "1", "cpu"):
        raise RuntimeError(f"REGOPS_BUILD_EXT={MODE!r} is not one of auto, 1, cpu, 0")
    torch = _import_target_torch()
    if torch is None:
        return _none("torch is not importable by the target interpreter; install torch first")
    if _find_cxx() is None:
        return _none("no C++ compiler found (set CXX)")
    cuda_home, why_no_cuda = None, None
    if MODE == "cpu":
        why_no_cuda = "REGOPS_BUILD_EXT=cpu"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is not a CUDA build"
    else:
        cuda_home = toolkit.find_cuda_home()
        if cuda_home is None:
            why_no_cuda = "no CUDA toolkit (nvcc) found; set CUDA_HOME"
            if MODE == "1":
                raise RuntimeError(f"REGOPS_BUILD_EXT=1 but the CUDA part cannot be built: {why_no_cuda}")
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", toolkit.DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(toolkit.default_jobs()))
    from torch.utils import cpp_extension

    sources = toolkit.extension_sources(os.path.join(HERE, "csrc"), cuda=cuda_home is not None)
    sources = [os.path.relpath(s, HERE) for s in sources]
    flags = toolkit.CXX_FLAGS
    info = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_kernels": True,
        "cuda_kernels": cuda_home is not None,
        "git_revision": toolkit.git_revision(HERE),
        "csrc_hash": toolkit.csrc_hash(os.path.join(HERE, "csrc")),
        "built_by": "setup.py",
    }
    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        info.update(
            cuda_version=toolkit.nvcc_version(cuda_home),
            cuda_home=cuda_home,
            arch_list=arch_list,
            cuda_archs=toolkit.cuda_archs(arch_list),
        )
        _log(f"building regops._C: CPU kernels, CUDA kernels with CUDA {info['cuda_version']} for {arch_list}")
        ext = cpp_extension.CUDAExtension(
            "regops._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": flags, "nvcc": toolkit.NVCC_FLAGS},
            extra_link_args=toolkit.LINK_FLAGS,
            optional=MODE != "1",
        )
    else:
        _log(f"building regops._C with the CPU kernels only ({why_no_cuda})")
        ext = cpp_extension.CppExtension(
            "regops._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": flags},
            extra_link_args=toolkit.LINK_FLAGS,
            optional=MODE != "1",
        )

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            super().run()
            # Beside the built library: the source tree for in-place/editable builds, build_lib for wheels.
            path = self.get_ext_fullpath("regops._C")
            if not os.path.exists(path):  # optional extension whose compile failed: setuptools warned
                _log("WARNING: regops._C failed to compile; installing without it (CPU: reference, GPU: Triton)")
                return
            with open(os.path.join(os.path.dirname(path), "_build_info.json"), "w") as f:
                json.dump(info, f, indent=1)

    version, requires = BASE_VERSION, BASE_REQUIRES
    if os.environ.get("REGOPS_LOCAL_VERSION", "1") != "0":
        version += "+" + toolkit.local_version(torch.__version__, torch.version.cuda if cuda_home else None)
    requires = [toolkit.torch_requirement(torch.__version__), *BASE_REQUIRES[1:]]
    return [ext], {"build_ext": BuildExt}, version, requires


ext_modules, cmdclass, version, install_requires = extensions()
# Every package under regops/, plus the Triton sources (kernels/) as regops.kernels and the C++/CUDA sources (csrc/)
# as regops.csrc: at the top of a checkout, neither is importable under its own name.
packages = [*find_packages(include=["regops", "regops.*"]), "regops.kernels", "regops.csrc"]
package_dir = {"regops.kernels": "kernels", "regops.csrc": "csrc"}
setup(
    version=version,
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=install_requires,
)
