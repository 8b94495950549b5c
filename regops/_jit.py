"""Building regops._C just in time, for an installation that came without it.

``regops.build_extension()`` compiles the CUDA sources shipped in ``regops.csrc`` with
``torch.utils.cpp_extension.load`` into a cache directory keyed by the regops, torch and CUDA versions, and loads
the result; from then on every process finds it there. With ``REGOPS_EXT=jit`` the first op on a CUDA tensor
builds it when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from regops import _cuda_toolkit
from regops._version import __version__

LIBRARY_NAME = "regops_C"


def cache_dir() -> Path:
    """``$REGOPS_CACHE`` or ``~/.cache/regops``, one sub-directory per (regops, torch, CUDA) combination."""
    root = os.environ.get("REGOPS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "regops"
    )
    variant = f"regops{__version__}-torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    return Path(root) / variant


def library_path() -> Path:
    return cache_dir() / f"{LIBRARY_NAME}.so"


def sources_dir() -> Path:
    """The CUDA sources: ``regops/csrc`` in an installed wheel, ``csrc/`` beside ``regops/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "regops.cpp").is_file():
            return candidate
    raise RuntimeError(f"regops: the CUDA sources are not installed (looked in {here / 'csrc'})")


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
    return _cuda_toolkit.DEFAULT_ARCHS


def build(verbose: bool = False) -> Path:
    """Compile regops._C for this machine into :func:`cache_dir` and load it into this process."""
    if torch.version.cuda is None:
        raise RuntimeError(f"regops: cannot build the CUDA extension: torch {torch.__version__} is not a CUDA build")
    cuda_home = _cuda_toolkit.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("regops: cannot build the CUDA extension: no CUDA toolkit (nvcc) found; set CUDA_HOME")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # torch's own guess is wrong when nvcc on PATH is a wrapper
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as exc:
        raise RuntimeError("regops: building the extension just in time needs ninja (pip install ninja)") from exc
    src = sources_dir()
    sources = sorted(str(p) for p in src.iterdir() if p.suffix in (".cpp", ".cu"))
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    arch_list = _arch_list()
    with _env(CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=arch_list, MAX_JOBS=str(_cuda_toolkit.default_jobs())):
        cpp_extension.load(
            name=LIBRARY_NAME,
            sources=sources,
            extra_include_paths=[str(src)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            build_directory=str(out),
            is_python_module=False,
            verbose=verbose,
        )
    info = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_version": _cuda_toolkit.nvcc_version(cuda_home),
        "cuda_home": cuda_home,
        "arch_list": arch_list,
        "cuda_archs": _cuda_toolkit.cuda_archs(arch_list),
        "built_by": "regops.build_extension",
    }
    (out / "_build_info.json").write_text(json.dumps(info, indent=1))
    return library_path()


def build_extension(verbose: bool = False) -> Path:
    """Build the CUDA extension for this torch and GPU into the cache and use it from now on.

    For an installation without ``regops._C`` (a pure-Python wheel, or a torch upgrade): needs ``nvcc`` (CUDA
    toolkit; ``CUDA_HOME`` if it is not found) and ``ninja``. Targets: ``TORCH_CUDA_ARCH_LIST``, else the
    visible GPU's architecture. Returns the path of the built library.

    >>> regops.build_extension()      # once per machine and torch version; later processes load it from the cache
    """
    from regops import _backend

    if _backend.extension() is not None:
        raise RuntimeError(f"regops: a CUDA extension is already loaded ({_backend.extension_status()})")
    path = build(verbose)
    _backend.reset_extension()
    return path
