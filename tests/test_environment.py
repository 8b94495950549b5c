"""The checkout's own folders never shadow an installed distribution when Python runs from the repository root
(``python -m pytest``, ``python -m benchmarks``, a script there), and the peers import and work from there."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str | None = None, *args: str, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, *(("-c", textwrap.dedent(code)) if code is not None else args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_bare_kernels_is_the_installed_distribution_or_missing():
    out = _run_from_root(
        """
        import os
        try:
            import kernels
        except ModuleNotFoundError as exc:
            assert exc.name == "kernels", exc
            print("missing")
        else:
            print(os.path.realpath(kernels.__file__))
        import regops.kernels.dropout
        print(regops.kernels.dropout.__name__)
        """
    )
    where, regops_kernels = out.split()
    if _installed("kernels"):
        assert "site-packages" in where and not where.startswith(str(ROOT / "kernels")), where
    else:
        assert where == "missing"
    assert regops_kernels == "regops.kernels.dropout"


@pytest.mark.skipif(not _installed("transformers"), reason="transformers is the peer that imports `kernels`")
def test_every_peer_imports_from_the_root_and_a_tiny_gpt2_builds():
    peers = [m for m, d in [
        ("timm", "timm"), ("torchvision", "torchvision"), ("opacus", "opacus"), ("backpack", "backpack-for-pytorch"),
        ("curvlinops", "curvlinops-for-pytorch"), ("pyhessian", "pyhessian"), ("liger_kernel", "liger-kernel"),
        ("cut_cross_entropy", "cut-cross-entropy"), ("peft", "peft"), ("adamp", "adamp"),
    ] if _installed(d)]  # fmt: skip
    out = _run_from_root(
        f"""
        import importlib
        for name in {peers!r}:
            importlib.import_module(name)
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
        print(model(torch.randint(0, 50, (2, 8))).logits.shape)
        """
    )
    assert "torch.Size([2, 8, 50])" in out


def test_benchmark_suite_runs_from_the_root():
    out = _run_from_root(None, "-m", "benchmarks", "--help")
    assert "regops benchmark suite" in out
