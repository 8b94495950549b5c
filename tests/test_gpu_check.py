"""scripts/gpu_check.sh --dry-run: the GPU check's comparisons under the Triton interpreter, so CI keeps it working."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("REGOPS_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "0 failed" in summary and " 0 ok" not in summary, summary
    # every family's kernels were compared on both offsets past 2**31 and 2**32
    for needle in (
        "dropout torch.float32 n=4097 offset=4294967293",
        "dropout_add_rms_norm",
        "probes gaussian",
        "ghost gram",
    ):
        assert needle in proc.stdout, needle
