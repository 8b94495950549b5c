"""Building regops._C just in time, for an installation that came without it.

:func:`regops.build_extension` (in :mod:`regops._core.extension`) compiles the sources shipped in
``regops.csrc`` (the C++ CPU kernels, plus the CUDA kernels when torch is a CUDA build and nvcc is found) with
``torch.utils.cpp_extension.load`` into a cache
directory keyed by the torch and CUDA versions and a hash of the sources and build flags, and loads the result;
from then on every process finds it there, and a checkout whose csrc/ changed gets a fresh build, never the old
one. With ``REGOPS_EXT=jit`` the first op on a CUDA tensor builds it when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from regops._core import toolkit
from regops._version import __version__

LIBRARY_NAME = "regops_C"


def cache_dir() -> Path:
    """``$REGOPS_CACHE`` or ``~/.cache/regops``, one sub-directory per (torch, CUDA, sources and flags)."""
    root = os.environ.get("REGOPS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "regops"
    )
    try:
        # Cheap to compute (no nvcc call, no CUDA query): it runs when a process first looks for the extension.
        key = toolkit.sources_hash(str(sources_dir()), [*toolkit.CXX_FLAGS, *toolkit.NVCC_FLAGS])
    except RuntimeError:  # no sources shipped: nothing can be built or found
        key = "nosources"
    variant = f"regops{__version__}-torch{torch.__version__}-cuda{torch.version.cuda}-{key}".replace("+", "_")
    return Path(root) / variant


def library_path() -> Path:
    return cache_dir() / f"{LIBRARY_NAME}.so"


def sources_dir() -> Path:
    """The C++/CUDA sources: ``regops/csrc`` in an installed wheel, ``csrc/`` beside ``regops/`` in a checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "module.cpp").is_file():
            return candidate
    raise RuntimeError(f"regops: the C++ sources are not installed (looked in {package / 'csrc'})")


def build_info() -> dict:
    try:
        return json.loads((cache_dir() / "_build_info.json").read_text())
    except (OSError, ValueError):
        return {}


def load_cached() -> Path | None:
    """Load a just-in-time build from the cache if one exists for this torch; returns its path."""
    path = library_path()
    info = build_info()
    if not path.is_file() or info.get("torch_version") != torch.__version__:
        return None
    torch.ops.load_library(str(path))
    return path


@contextlib.contextmanager
def _env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _arch_list() -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return toolkit.DEFAULT_ARCHS


def _uniquely_named(src: Path, sources: list[str], out: Path) -> list[str]:
    """One file per source whose name is its path under ``src`` (``dropout/cpu.cpp`` -> ``dropout__cpu.cpp``), that
    includes it: torch names every object after its source's file name, in one directory, and the families share
    file names. The source's own quoted includes still resolve next to it."""
    staged = out / "sources"
    staged.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sources:
        rel = Path(path).resolve().relative_to(src.resolve())
        wrapper = staged / "__".join(rel.parts)
        text = f'#include "{Path(path).resolve()}"\n'
        if not wrapper.is_file() or wrapper.read_text() != text:
            wrapper.write_text(text)
        names.append(str(wrapper))
    return names


def build(verbose: bool = False) -> Path:
    """Compile regops._C for this machine into :func:`cache_dir` and load it into this process: the C++ CPU
    kernels, and the CUDA kernels when torch is a CUDA build and a CUDA toolkit is found."""
    cuda_home = toolkit.find_cuda_home() if torch.version.cuda is not None else None
    arch_list = _arch_list() if cuda_home else ""
    # CUDA_HOME before torch.utils.cpp_extension is imported: it reads it at import, and torch's own guess (from a
    # wrapper nvcc on PATH) is wrong and prints a misleading "No CUDA runtime is found".
    env = {"MAX_JOBS": str(toolkit.default_jobs())}
    if cuda_home:
        env.update(CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=arch_list)
    with _env(**env):
        from torch.utils import cpp_extension

        if cuda_home:
            cpp_extension.CUDA_HOME = cuda_home
        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError as exc:
            raise RuntimeError("regops: building the extension just in time needs ninja (pip install ninja)") from exc
        src = sources_dir()
        out = cache_dir()
        out.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=LIBRARY_NAME,
            sources=_uniquely_named(src, toolkit.extension_sources(str(src), cuda=cuda_home is not None), out),
            extra_include_paths=[str(src)],
            extra_cflags=toolkit.CXX_FLAGS,
            extra_ldflags=toolkit.LINK_FLAGS,
            extra_cuda_cflags=toolkit.NVCC_FLAGS,
            build_directory=str(out),
            is_python_module=False,
            verbose=verbose,
        )
    info = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_kernels": True,
        "cuda_kernels": cuda_home is not None,
        "csrc_hash": toolkit.csrc_hash(str(src)),
        "built_by": "regops.build_extension",
    }
    if cuda_home:
        info.update(
            cuda_version=toolkit.nvcc_version(cuda_home),
            cuda_home=cuda_home,
            arch_list=arch_list,
            cuda_archs=toolkit.cuda_archs(arch_list),
        )
    (out / "_build_info.json").write_text(json.dumps(info, indent=1))
    return library_path()
