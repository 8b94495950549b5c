"""The benchmark harness: a missing peer skips only its variant; native profiler noise stays out of the output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_a_crash_in_a_case_or_a_variant_propagates():
    """A broken case or a regops variant that raises is a bug: the run stops instead of reporting a row."""

    def broken(device, quick):
        raise ValueError("bad shape")

    with pytest.raises(ValueError, match="bad shape"):
        harness.run_case(harness.Case("test", "broken", "", broken, ("cpu",)), torch.device("cpu"), 1e9, True)

    def crashing(device, quick):
        def boom():
            raise RuntimeError("kernel crashed")

        return harness.Setup({"regops": boom}, bytes=8)

    with pytest.raises(RuntimeError, match="kernel crashed"):
        harness.run_case(harness.Case("test", "crash", "", crashing, ("cpu",)), torch.device("cpu"), 1e9, True)


def test_a_peer_that_refuses_or_cannot_run_here_is_a_row_with_the_reason():
    def make(device, quick):
        def refuses():
            raise NotImplementedError("Parameter tying is not supported")

        return harness.Setup(
            {"regops": lambda: torch.ones(4) * 2, "opacus": harness.peer(refuses, "opacus")},
            bytes=32,
            skipped={"liger": "Liger's kernels are Triton: they need a CUDA GPU"},
        )

    rows = {
        r["variant"]: r for r in harness.run_case(harness.Case("t", "peer", "", make), torch.device("cpu"), 1e9, True)
    }
    assert rows["regops"]["ms_min"] <= rows["regops"]["ms"] and rows["regops"]["rounds"] >= 3
    assert rows["opacus"]["error"] == "skipped: opacus: NotImplementedError: Parameter tying is not supported"
    assert rows["liger"]["error"] == "skipped: Liger's kernels are Triton: they need a CUDA GPU"


def test_record_keeps_every_run(tmp_path):
    path = tmp_path / "cpu" / "bar.json"
    harness.record(path, {"environment": {"n": 1}, "results": []})
    harness.record(path, {"environment": {"n": 2}, "results": []})
    assert [r["environment"]["n"] for r in json.loads(path.read_text())["runs"]] == [1, 2]


def test_native_output_of_the_profiler_is_silenced():
    code = (
        "import os, torch\n"
        "from benchmarks import harness\n"
        "with harness._quiet_native_output():\n"
        "    os.write(1, b'USDT profiler_start noise\\n')\n"
        "    os.write(2, b'gpuGetDeviceCount failed\\n')\n"
        "print(harness._cpu_peak(lambda: torch.ones(1000) * 2) > 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "True\n", proc.stdout
    assert "USDT" not in proc.stderr and "gpuGetDeviceCount" not in proc.stderr, proc.stderr
