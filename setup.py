"""Builds the optional CUDA extension regops._C; everything else is declared in pyproject.toml.

REGOPS_BUILD_EXT=auto (default): build when torch is a CUDA build and a CUDA toolkit (nvcc) is found;
REGOPS_BUILD_EXT=1: fail if it cannot be built; REGOPS_BUILD_EXT=0: never build (pure Python + Triton).
TORCH_CUDA_ARCH_LIST picks the targets (default "8.0;8.6;8.9;9.0+PTX"). The build needs torch importable
(pip install --no-build-isolation). A build with the extension gets a local version naming its variant
(0.1.0+cu130.torch2.14) unless REGOPS_LOCAL_VERSION=0.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("REGOPS_BUILD_EXT", "auto").strip().lower()


def _load(name: str):
    """A module of the regops source tree, loaded by path: regops itself is not importable during its build."""
    spec = importlib.util.spec_from_file_location(f"_regops_setup_{name}", os.path.join(HERE, "regops", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toolkit = _load("_cuda_toolkit")
BASE_VERSION = re.search(r'__version__ = "([^"]+)"', open(os.path.join(HERE, "regops", "_version.py")).read())[1]


def _log(msg: str) -> None:
    print(f"regops setup: {msg}", file=sys.stderr)


def _skip(reason: str):
    if MODE == "1":
        raise RuntimeError(f"REGOPS_BUILD_EXT=1 but the CUDA extension cannot be built: {reason}")
    _log(f"building without the CUDA extension ({reason}); GPU ops will use Triton")
    return [], {}, BASE_VERSION


def extensions():
    if MODE in ("0", "false", "no", "off"):
        return [], {}, BASE_VERSION
    try:
        import torch
    except ImportError:
        return _skip("torch is not importable in the build environment (use pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = toolkit.find_cuda_home()
    if cuda_home is None:
        return _skip("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", toolkit.DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(toolkit.default_jobs()))
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    info = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_version": toolkit.nvcc_version(cuda_home),
        "cuda_home": cuda_home,
        "arch_list": arch_list,
        "cuda_archs": toolkit.cuda_archs(arch_list),
        "git_revision": toolkit.git_revision(HERE),
        "built_by": "setup.py",
    }
    _log(f"building regops._C with CUDA {info['cuda_version']} at {cuda_home} for {arch_list}")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    ext = cpp_extension.CUDAExtension(
        "regops._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            super().run()
            # Beside the built library: the source tree for in-place/editable builds, build_lib for wheels.
            out_dir = os.path.dirname(self.get_ext_fullpath("regops._C"))
            with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                json.dump(info, f, indent=1)

    version = BASE_VERSION
    if os.environ.get("REGOPS_LOCAL_VERSION", "1") != "0":
        version += "+" + toolkit.local_version(torch.__version__, torch.version.cuda)
    return [ext], {"build_ext": BuildExt}, version


ext_modules, cmdclass, version = extensions()
setup(version=version, ext_modules=ext_modules, cmdclass=cmdclass)
