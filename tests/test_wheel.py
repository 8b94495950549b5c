"""Wheels for CUDA targets: the documented build command, a fresh environment, and the just-in-time build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CAN_BUILD = bool(shutil.which("nvcc")) and torch.version.cuda is not None

needs_toolkit = pytest.mark.skipif(not CAN_BUILD, reason="needs nvcc and a CUDA build of torch")
# A CUDA wheel (four architectures) or a just-in-time build takes longer than the suite's per-test default.
pytestmark = pytest.mark.timeout(3600)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "REGOPS_BACKEND", "PYTHONPATH")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not CAN_BUILD:
        pytest.skip("needs nvcc and a CUDA build of torch")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_wheel.sh"), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        # The manylinux repair needs auditwheel; without it on PATH the script would fetch it: tests stay offline.
        env=_clean_env(REGOPS_VENV=sys.prefix, REGOPS_MANYLINUX="1" if shutil.which("auditwheel") else "0"),
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
        assert f".{arch}.cubin" in proc.stdout, proc.stdout
    assert ".sm_90.ptx" in proc.stdout
    (path,) = out.glob("regops-*.whl")
    return path


@needs_toolkit
def test_wheel_name_and_contents(wheel):
    cuda = torch.version.cuda.replace(".", "")
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert f"+cu{cuda}.torch{torch_mm}-" in wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = json.loads(z.read("regops/_build_info.json"))
    assert any(n.startswith("regops/_C") and n.endswith(".so") for n in names)
    for required in (
        "regops/kernels/dropout.py",
        "regops/_core/philox.py",
        "regops/csrc/module.cpp",
        "regops/csrc/dropout/cpu.cpp",
        "regops/csrc/dropout/cuda.cpp",
        "regops/csrc/dropout/kernels.cu",
        "regops/csrc/common/philox.cuh",
    ):
        assert required in names, required
    assert info["cuda_archs"] == ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]
    assert info["torch_version"] == torch.__version__ and info["git_revision"]


def _fresh_env(tmp_path: Path, wheel: Path) -> Path:
    """A new virtual environment with only the wheel installed; torch comes from this environment's
    site-packages through a path entry (processed after the venv's own, and without its .pth hooks, so this
    checkout's editable regops stays invisible)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.strip()
    # the directory torch is imported from (this environment's site-packages, or one it chains to with a .pth)
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    Path(site, "parent-torch.pth").write_text(torch_site + "\n")
    with zipfile.ZipFile(wheel) as z:  # installing a wheel is unpacking it into site-packages
        z.extractall(site)
    return py


@needs_toolkit
def test_wheel_installs_into_fresh_env_runs_op_and_reports_archs(wheel, tmp_path):
    py = _fresh_env(tmp_path, wheel)
    code = (
        "import regops, torch\n"
        "assert 'site-packages' in regops.__file__ and 'regops/__init__' in regops.__file__.replace('\\\\', '/')\n"
        "x = torch.randn(1000, requires_grad=True)\n"
        "y = regops.dropout(x, 0.3)\n"
        "y.sum().backward()\n"
        "assert torch.equal(x.grad != 0, y != 0)\n"
        "print(regops.__file__)"
    )
    proc = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(tmp_path) in proc.stdout
    info = subprocess.run(
        [py, "-m", "regops.info"], capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=300
    )
    assert info.returncode == 0, info.stderr[-3000:]
    assert "regops._C     loaded" in info.stdout
    assert "sm_80 sm_86 sm_89 sm_90 compute_90" in info.stdout


@needs_toolkit
def test_just_in_time_build_into_cache_and_reuse(tmp_path):
    pytest.importorskip("ninja")
    env = _clean_env(REGOPS_EXT="jit", REGOPS_CACHE=str(tmp_path / "cache"), TORCH_CUDA_ARCH_LIST="8.0")
    build = (
        "import torch, regops\n"
        "from regops._core import dispatch, extension\n"
        "assert extension.load() is None\n"  # nothing cached yet, and no GPU to build on first use
        "path = regops.build_extension()\n"
        "assert extension.load() is not None, extension.status()\n"
        "assert dispatch.native_registered('dropout', 'cpp') and dispatch.native_registered('dropout', 'cuda')\n"
        "x, p = torch.randn(1000), torch.tensor(0.3, dtype=torch.float64)\n"
        "seed = torch.tensor([1, 2])\n"
        "with regops.use_backend('torch'):\n"
        "    want = torch.ops.regops.dropout(x, p, seed)\n"
        "assert dispatch.choose('dropout', x.device) == 'cpp'\n"
        "assert torch.equal(torch.ops.regops.dropout(x, p, seed), want)\n"
        "print(path)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", build], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1800
    )
    if "CUDA" in proc.stderr and "not available" in proc.stderr and proc.returncode != 0 and torch.cuda.is_available():
        pytest.fail(proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    library = Path(proc.stdout.strip().splitlines()[-1])
    assert library.is_file() and library.parent.parent == tmp_path / "cache"
    reuse = (
        "import regops\nfrom regops._core import dispatch, extension\n"
        "assert extension.load() is not None, extension.status()\n"
        "assert dispatch.native_registered('dropout', 'cuda')\n"
        "print(extension.status())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", reuse], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "just-in-time build" in proc.stdout
    info = subprocess.run(
        [sys.executable, "-m", "regops.info"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert "just-in-time" in info.stdout and "sm_80" in info.stdout


def test_extension_can_be_switched_off():
    code = "from regops._core import extension\nassert extension.load() is None\nprint(extension.status())"
    env = _clean_env(REGOPS_EXT="off")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "REGOPS_EXT=off" in proc.stdout, proc.stderr
