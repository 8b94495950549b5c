"""What a CPU user pays in memory for regops' first op: the growth of the process's resident set (RSS) from before
to after the first call of a few ops on CPU tensors, each in a fresh interpreter that has imported torch and regops
(so the growth is what the first call loads: the extension, the op's registration, its kernels' pages). Appends
to ``benchmarks/results/<device>/first-op-rss.json``.

    python -m benchmarks.first_op_rss
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from benchmarks import harness

CALLS = {
    "dropout": "regops.dropout(torch.randn(1000), 0.1)",
    "cross_entropy": "regops.cross_entropy(torch.randn(8, 10), torch.randint(0, 10, (8,)))",
    "mix_batch": "regops.mix_batch(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)), mixup_alpha=0.8)",
}

PROBE = r"""
import json, sys
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
import torch
import regops
from regops._core import extension
before = rss_mib()
exec(sys.argv[1])
after = rss_mib()
print(json.dumps({"before_mib": before, "after_mib": after, "extension": extension.status()}))
"""


def measure(call: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, call], capture_output=True, text=True, check=True, timeout=300)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["growth_mib"] = out["after_mib"] - out["before_mib"]
    return out


def main() -> dict:
    rows = {name: measure(call) for name, call in CALLS.items()}
    for name, row in rows.items():
        print(f"{name:<14} first CPU call: +{row['growth_mib']:.1f} MiB RSS ({row['extension']})")
    env = harness.environment(torch.device("cpu"), ["python", "-m", "benchmarks.first_op_rss"])
    result = {"environment": env, "ops": rows}
    print(f"appended to {harness.record(harness.result_path('first-op-rss'), result)}")
    return result


if __name__ == "__main__":
    main()
