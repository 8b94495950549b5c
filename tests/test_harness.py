"""The benchmark harness: a missing peer skips only its variant; native profiler noise stays out of the output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]


def _make(device, quick):
    from regops_test_absent_peer import baseline  # not installed: stubbed while the case is built
    from regops_test_absent_peer.sub import other

    x = torch.ones(8)
    return harness.Setup({"regops": lambda: x * 2, "absent": lambda: baseline(x) + other(x)}, bytes=64)


def test_missing_peer_skips_its_variant_only():
    c = harness.Case("test", "absent peer", "", _make, ("cpu",))
    rows = harness.run_case(c, torch.device("cpu"), copy_bps=1e9, quick=True)
    by_variant = {r["variant"]: r for r in rows}
    assert "ms" in by_variant["regops"]
    assert by_variant["absent"]["error"] == "skipped: peer 'regops_test_absent_peer' is not installed"
    assert "regops_test_absent_peer" not in sys.modules
    assert not any(isinstance(f, harness._StubFinder) for f in sys.meta_path)


def test_a_case_that_cannot_be_built_is_reported():
    def broken(device, quick):
        raise ValueError("bad shape")

    (row,) = harness.run_case(harness.Case("test", "broken", "", broken, ("cpu",)), torch.device("cpu"), 1e9, True)
    assert row["error"].startswith("case not built: ValueError: bad shape")


def test_native_output_of_the_profiler_is_silenced():
    code = (
        "import os, torch\n"
        "from benchmarks import harness\n"
        "with harness._quiet_native_output():\n"
        "    os.write(1, b'USDT profiler_start noise\\n')\n"
        "    os.write(2, b'gpuGetDeviceCount failed\\n')\n"
        "print(harness._cpu_peak(lambda: torch.ones(1000) * 2) > 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "True\n", proc.stdout
    assert "USDT" not in proc.stderr and "gpuGetDeviceCount" not in proc.stderr, proc.stderr
