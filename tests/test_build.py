"""Build-level checks: the extension's cubins, lazy import, info (Triton AOT compiles: test_kernels_compile.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from regops._core import dispatch, extension, jit, toolkit

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=300
    )


def _cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump")]
    if extension.prebuilt_info().get("cuda_home"):
        candidates.append(os.path.join(extension.prebuilt_info()["cuda_home"], "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def _extension_path() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("regops._C")
    return Path(spec.origin) if spec and spec.origin else None


def test_extension_holds_cubins_for_every_recorded_arch():
    so = _extension_path()
    if so is None:
        if shutil.which("nvcc") and torch.version.cuda and os.environ.get("REGOPS_BUILD_EXT", "auto") != "0":
            pytest.fail("nvcc and a CUDA torch are present but regops._C was not built")
        pytest.skip("regops._C not built (no nvcc or REGOPS_BUILD_EXT=0)")
    if not extension.prebuilt_info().get("cuda_kernels", True):
        pytest.skip("regops._C was built with its C++ CPU kernels only (REGOPS_BUILD_EXT=cpu)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump available")
    elf = subprocess.run([tool, "--list-elf", str(so)], capture_output=True, text=True, timeout=300).stdout
    ptx = subprocess.run([tool, "--list-ptx", str(so)], capture_output=True, text=True, timeout=300).stdout
    info = extension.prebuilt_info()
    assert info, "regops._C is built but _build_info.json is missing"
    for arch in info["cuda_archs"]:
        if arch.startswith("sm_"):
            assert f".{arch}.cubin" in elf, f"{arch} missing from:\n{elf}"
        else:
            assert f".sm_{arch.removeprefix('compute_')}.ptx" in ptx, f"{arch} PTX missing from:\n{ptx}"
    if info["arch_list"] == "8.0;8.6;8.9;9.0+PTX":
        for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
            assert f".{arch}.cubin" in elf
    # torch guesses /usr/local from a wrapper nvcc; the build must have found the real toolkit.
    assert os.path.isfile(os.path.join(info["cuda_home"], "include", "cuda_runtime.h"))


def test_import_is_lazy():
    code = (
        "import sys, torch, regops\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'regops._C' not in sys.modules, 'extension loaded'\n"
        "x = torch.randn(10, requires_grad=True)\n"
        "regops.dropout(x, 0.5).sum().backward()\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')"
    )
    proc = _run(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_info_reports_versions_extension_and_backends():
    proc = subprocess.run([sys.executable, "-m", "regops.info"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch         {torch.__version__}" in out
    assert "regops._C" in out
    for op in dispatch.registered_ops():
        assert op in out
    if extension.load() is not None:
        n_cpp = sum(dispatch.native_registered(op, "cpp") for op in dispatch.registered_ops())
        assert n_cpp > 0 and f"CPU kernels C++, {n_cpp} ops" in out
        if extension.build_info().get("cuda_kernels"):
            assert "archs" in out and "sm_80" in out
        else:
            assert "CUDA kernels no" in out and "archs" not in out


def test_extension_built_for_another_torch_warns_once_and_falls_back():
    if _extension_path() is None:
        pytest.skip("regops._C not built")
    code = (
        "import warnings, torch, regops\n"
        "from regops._core import dispatch, extension\n"
        "info = dict(extension.prebuilt_info()); info['torch_version'] = '1.13.0'\n"
        "extension.prebuilt_info = lambda: info\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert extension.load() is None\n"
        "    assert extension.load() is None\n"
        "    assert dispatch.choose('dropout', torch.device('cpu')) == 'torch'\n"
        "    assert dispatch.choose('dropout', torch.device('cuda')) == 'triton'\n"
        "msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]\n"
        "assert len(msgs) == 1 and 'built for torch 1.13.0' in msgs[0], msgs\n"
        "print('ok')"
    )
    proc = _run(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ packaging
def test_label_guard_and_requirement_agree_on_the_torch_minor_release(monkeypatch):
    assert toolkit.local_version("2.14.1+cu130", "13.0") == "cu130.torch2.14"
    assert toolkit.local_version("2.14.1", None) == "cpu.torch2.14"
    assert toolkit.torch_requirement("2.14.1+cu130") == "torch>=2.14,<2.15"
    built = {"torch_version": "2.14.1+cu130", "torch_cuda": "13.0", "cuda_kernels": True}
    monkeypatch.setattr(extension, "prebuilt_info", lambda: built)
    for running, cuda, ok in [
        ("2.14.0+cu130", "13.0", True),
        ("2.14.3+cu130", "13.0", True),
        ("2.15.0+cu130", "13.0", False),
        ("2.14.1+cu128", "12.8", False),
    ]:
        monkeypatch.setattr(torch, "__version__", running)
        monkeypatch.setattr(torch.version, "cuda", cuda)
        assert (extension.torch_mismatch() is None) == ok, running
    built["cuda_kernels"] = False  # CPU kernels only: the CUDA release torch was built with does not matter
    assert extension.torch_mismatch() is None


def test_prebuilt_for_another_torch_but_a_jit_build_loads_without_a_warning(monkeypatch, tmp_path, recwarn):
    monkeypatch.setenv("REGOPS_EXT", "auto")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "regops._C" else None)
    monkeypatch.setattr(extension, "_load_prebuilt", lambda: (None, "regops._C was built for torch 1.13.0"))
    monkeypatch.setattr(jit, "load_cached", lambda: tmp_path / "regops_C.so")
    module, reason = extension._load()
    assert module is not None and "just-in-time build" in reason and "1.13.0" in reason
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    monkeypatch.setattr(jit, "load_cached", lambda: None)
    with pytest.warns(RuntimeWarning, match="built for torch 1.13.0.*fall back"):
        assert extension._load()[0] is None


def test_jit_cache_is_keyed_on_sources_and_flags(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", src)
    key = toolkit.sources_hash(str(src), toolkit.CXX_FLAGS)
    assert key == toolkit.sources_hash(str(src), toolkit.CXX_FLAGS)
    assert key != toolkit.sources_hash(str(src), [*toolkit.CXX_FLAGS, "-DX"])
    header = src / "common" / "philox.cuh"
    header.write_text(header.read_text() + "\n// changed\n")
    assert key != toolkit.sources_hash(str(src), toolkit.CXX_FLAGS)


def test_pure_wheel_after_an_extension_build_ships_no_build_info(tmp_path):
    """A stale regops/_build_info.json beside an in-place build must not end up in a py3-none-any wheel."""
    checkout = tmp_path / "src"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.so", "benchmarks"))
    (checkout / "regops" / "_build_info.json").write_text(json.dumps({"torch_version": "2.14.1+cu130"}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["REGOPS_BUILD_EXT"] = "0"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp_path), "."]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("regops-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "regops/_build_info.json" not in names
    assert not any(n.endswith(".so") for n in names)
    assert "License-Expression: Apache-2.0" in meta and any(n.endswith("licenses/LICENSE") for n in names)


def test_the_first_cpu_op_costs_little_memory():
    """A CPU user does not pay for what the CPU path does not use (the CUDA kernels, torch.compile's machinery):
    the first call of dropout, cross_entropy and mix_batch on CPU tensors grows the process's RSS by <= 40 MiB."""
    from benchmarks.first_op_rss import CALLS, measure

    for name, call in CALLS.items():
        growth = measure(call)["growth_mib"]
        assert growth <= 40, (name, growth)
