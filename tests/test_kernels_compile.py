"""Triton kernels compiled ahead of time for real GPUs (sm_80, sm_90) without one: registers and spills.

The interpreter runs every kernel on CPU but knows nothing of registers: a kernel whose tile is too large for the
register file spills to local memory on a GPU (slow, and for the LayerNorm backward at 65536 columns ~30 KB per
thread). Here every configuration the LayerNorm launchers pick for hidden sizes up to 65536 is compiled with
``triton.compile`` for ``GPUTarget("cuda", 80|90, 32)`` (ptxas reports registers and spill bytes) and any spill
fails the test. Each distinct configuration compiles once, in one subprocess shared by the assertions.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_COLS = 65536

# Compiles every (kernel, dtype, config) the LayerNorm launchers use for hidden sizes 1 .. 65536 and prints one
# JSON list of {label, arch, regs, spill_stores, spill_loads}. ptxas's -v report is what Triton logs when
# TRITON_DUMP_PTXAS_LOG=1; a fresh cache directory makes sure ptxas runs (a cache hit logs nothing).
COMPILE_NORMS = r"""
import contextlib, io, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from regops.kernels import dropout_fused as F

max_cols = int(sys.argv[1])
configs = sorted({F.norm_config(2**k) for k in range(max_cols.bit_length())}, key=lambda c: (c.looped, c.block_c))
results = []
for cfg in configs:
    for dtype in ("*fp32", "*bf16", "*fp16"):
        for backward in (False, True):
            # s in float32 (residual_in_fp32): the widest variant of each dtype
            kernel, sig, constexprs = F.layer_norm_spec(cfg.looped, backward, dtype, "*fp32", cfg)
            for arch in (80, 90):
                log = io.StringIO()
                with contextlib.redirect_stdout(log):
                    triton.compile(
                        ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in constexprs}},
                                  constexprs=constexprs),
                        target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": cfg.num_warps, "maxnreg": cfg.maxnreg},
                    )
                text = log.getvalue()
                regs = [int(v) for v in re.findall(r"Used (\d+) registers", text)]
                spill_pattern = r"(\d+) bytes spill stores, (\d+) bytes spill loads"
                spills = [tuple(map(int, m)) for m in re.findall(spill_pattern, text)]
                assert regs and spills, f"no ptxas report for {kernel.fn.__name__}: {text[-500:]}"
                results.append({
                    "label": f"{kernel.fn.__name__}[{dtype[1:]}, BLOCK_R={cfg.block_r}, BLOCK_C={cfg.block_c}, "
                             f"warps={cfg.num_warps}, maxnreg={cfg.maxnreg}]",
                    "arch": arch, "regs": max(regs),
                    "spill_stores": max(s for s, _ in spills), "spill_loads": max(l for _, l in spills),
                })
print(json.dumps(results))
"""


@functools.cache
def _norm_report() -> list[dict]:
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
        proc = subprocess.run(
            [sys.executable, "-c", COMPILE_NORMS, str(MAX_COLS)], capture_output=True, text=True, env=env, cwd=ROOT
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_layer_norm_kernels_never_spill_up_to_65536_columns():
    pytest.importorskip("triton")
    report = _norm_report()
    lines = [
        f"sm_{r['arch']} {r['label']}: {r['regs']} regs, spills {r['spill_stores']}/{r['spill_loads']} B"
        for r in report
    ]
    print("\n".join(lines))
    spilled = [line for line, r in zip(lines, report, strict=True) if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "LayerNorm kernels spill:\n" + "\n".join(spilled)
    # both kernels, both layouts (whole rows and looped rows), all three dtypes, both archs
    assert {r["arch"] for r in report} == {80, 90}
    assert {r["label"].split("[")[0] for r in report} == {
        "dropout_add_layer_norm_fwd_kernel",
        "dropout_add_layer_norm_bwd_kernel",
        "dropout_add_layer_norm_fwd_looped_kernel",
        "dropout_add_layer_norm_bwd_looped_kernel",
    }
