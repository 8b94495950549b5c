"""Triton kernels compiled ahead of time for real GPUs (sm_80, sm_90) without one: every kernel compiles, and
the LayerNorm kernels never spill.

The interpreter runs every kernel on CPU but knows nothing of registers: a kernel whose tile is too large for the
register file spills to local memory on a GPU (slow; the old whole-row LayerNorm backward spilled ~30 KB per
thread at 65536 columns). One subprocess compiles, with ``triton.compile`` for ``GPUTarget("cuda", 80|90, 32)``:

* every ``COMPILE_SPECS`` entry of every kernel module (each ``*_kernel`` must have one), and
* every configuration the LayerNorm launchers pick for hidden sizes 1 .. 65536 (``norm_config``), in fp32, bf16
  and fp16 with every option on, with the launchers' ``num_warps`` and ``maxnreg``;

each distinct (kernel, signature, constants, options, arch) once. ptxas's ``-v`` report (what Triton logs with
``TRITON_DUMP_PTXAS_LOG=1``; a fresh cache directory makes sure ptxas runs) gives registers and spill bytes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_COLS = 65536

COMPILE_ALL = r"""
import contextlib, importlib, io, json, multiprocessing, os, pkgutil, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
import regops.kernels as K
from regops.kernels import dropout_fused as F

SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
report = {"compiled": [], "missing_spec": [], "failed": [], "norms": []}
jobs = {}  # label -> (module, kernel, signature, constexprs, options); a dict: each distinct job once
for info in pkgutil.iter_modules(K.__path__):
    mod = importlib.import_module(f"regops.kernels.{info.name}")
    specs = getattr(mod, "COMPILE_SPECS", [])
    covered = {spec[0].fn.__name__ for spec in specs}
    for name, obj in vars(mod).items():
        if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__ and name.endswith("_kernel"):
            if name not in covered:
                report["missing_spec"].append(f"{info.name}.{name}")
    for kernel, signature, constexprs, *options in specs:
        options = options[0] if options else {}
        label = f"{info.name}.{kernel.fn.__name__}[{','.join(map(str, signature.values()))}]{constexprs}{options}"
        jobs[label] = (info.name, kernel, signature, constexprs, options)
max_cols = int(sys.argv[1])
norm_labels = set()
for cfg in {F.norm_config(2**k) for k in range(max_cols.bit_length())}:
    for dtype in ("*fp32", "*bf16", "*fp16"):
        for backward in (False, True):
            # s in float32 (residual_in_fp32): the widest variant of each dtype
            kernel, signature, constexprs = F.layer_norm_spec(cfg.looped, backward, dtype, "*fp32", cfg)
            options = {"num_warps": cfg.num_warps, "maxnreg": cfg.maxnreg}
            label = f"dropout_fused.{kernel.fn.__name__}[{','.join(map(str, signature.values()))}]{constexprs}{options}"
            jobs[label] = ("dropout_fused", kernel, signature, constexprs, options)
            norm_labels.add(label)
def compile_one(task):
    label, arch = task
    module, kernel, signature, constexprs, options = jobs[label]
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                 target=GPUTarget("cuda", arch, 32), options=options)
        assert len(out.asm["cubin"]) > 0
    except Exception as exc:
        return label, f"{label} sm_{arch}: {type(exc).__name__}: {str(exc)[:300]}"
    text = log.getvalue()
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", text)]
    spills = [tuple(map(int, m)) for m in SPILLS.findall(text)]
    return label, {"label": f"{label} sm_{arch}", "arch": arch, "regs": max(regs, default=-1),
                   "spill_stores": max((s for s, _ in spills), default=-1),
                   "spill_loads": max((s for _, s in spills), default=-1)}

# One worker per core, forked after the jobs are built (they inherit them; nothing touches a GPU).
tasks = [(label, arch) for label in jobs for arch in (80, 90)]
with multiprocessing.get_context("fork").Pool(min(len(tasks), os.cpu_count() or 1)) as pool:
    for label, entry in pool.imap(compile_one, tasks):
        if isinstance(entry, str):
            report["failed"].append(entry)
            continue
        report["compiled"].append(entry)
        if label in norm_labels:
            report["norms"].append(entry)
print(json.dumps(report))
"""


@functools.cache
def _compile_all() -> tuple[dict | None, str]:
    """The report, or why there is none (cached either way: the two tests share one compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=cache)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", COMPILE_ALL, str(MAX_COLS)],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                timeout=500,
            )
        except subprocess.TimeoutExpired as exc:
            return None, f"the compile did not finish in {exc.timeout} s"
    if proc.returncode != 0:
        return None, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def _report() -> dict:
    report, why = _compile_all()
    assert report is not None, why
    return report


def _line(r: dict) -> str:
    return f"{r['label']}: {r['regs']} registers, spills {r['spill_stores']}/{r['spill_loads']} B"


def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton")
    report = _report()
    assert not report["failed"], "\n".join(report["failed"])
    assert not report["missing_spec"], f"kernels without a COMPILE_SPECS entry: {report['missing_spec']}"
    labels = [r["label"] for r in report["compiled"]]
    assert any(label.startswith("dropout.dropout_kernel") and label.endswith("sm_90") for label in labels)
    # the register report covers every compiled kernel (informational: spills outside LayerNorm are not failures)
    print("\n".join(_line(r) for r in report["compiled"] if r["spill_stores"] or r["spill_loads"]))
    assert all(r["regs"] > 0 and r["spill_stores"] >= 0 for r in report["compiled"]), "no ptxas report"


def test_layer_norm_kernels_never_spill_up_to_65536_columns():
    pytest.importorskip("triton")
    norms = _report()["norms"]
    print("\n".join(_line(r) for r in norms))
    spilled = [_line(r) for r in norms if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "LayerNorm kernels spill:\n" + "\n".join(spilled)
    # both kernels, both layouts (whole rows and looped rows), all three dtypes, both archs
    assert {r["arch"] for r in norms} == {80, 90}
    kernels = {r["label"].split("[")[0] for r in norms}
    assert kernels == {
        f"dropout_fused.dropout_add_layer_norm_{d}{loop}_kernel" for d in ("fwd", "bwd") for loop in ("", "_looped")
    }
    assert all(any(f"[*{dt}," in r["label"] for r in norms) for dt in ("fp32", "bf16", "fp16"))
    assert len(norms) == 5 * 3 * 2 * 2  # 5 configurations x 3 dtypes x fwd/bwd x 2 archs
