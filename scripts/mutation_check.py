"""Mutation pass: plant one deliberate bug at a time in a kernel or a reference and check that the tests covering it
turn red.

    python scripts/mutation_check.py            # every mutation (the C++ ones build regops._C just in time)
    python scripts/mutation_check.py --list     # what each mutation changes
    python scripts/mutation_check.py --only keep-threshold dropout-scale

Each mutation replaces one exact piece of source text (the script refuses to run if it is not found, so a mutation
that no longer applies is noticed), runs its tests in a fresh process, and restores the file whatever happens. The
selected tests are first run unmutated and must pass. A C++ mutation is compiled just in time into a throwaway cache
(``REGOPS_EXT=jit``), so the installed extension is never touched. Exit status 0 only when every mutation is caught.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 1200
BUILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    native: bool = False  # C++: needs a build
    hide: str = ""  # a glob of files moved aside instead (an environment without them)


MUTATIONS = [
    Mutation(
        "keep-threshold",
        "Triton Philox keep mask: keep iff (word >> 1) >= threshold instead of > (off by one at the threshold)",
        "kernels/philox.py",
        "return (words >> 1).to(tl.int32, bitcast=True) > threshold",
        "return (words >> 1).to(tl.int32, bitcast=True) >= threshold",
        ("tests/dropout/test_ops.py", "-k", "kernel and triton"),
    ),
    Mutation(
        "dropout-scale",
        "Triton dropout: survivors not scaled by 1/(1-p)",
        "kernels/dropout.py",
        "    y = x * tl.where(keep, scale, 0.0)  # multiply, as torch: NaN/Inf at a dropped position -> NaN\n"
        "    tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)\n\n\n"
        '@triton.jit(do_not_specialize=["n", "threshold"])\ndef dropout_bitmask_kernel',
        "    y = x * tl.where(keep, 1.0, 0.0)\n"
        "    tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)\n\n\n"
        '@triton.jit(do_not_specialize=["n", "threshold"])\ndef dropout_bitmask_kernel',
        ("tests/dropout/test_ops.py", "-k", "kernel and triton"),
    ),
    Mutation(
        "loss-label-column",
        "Triton cross-entropy statistics: the label column off by one (EL2N / margin exclude the wrong class)",
        "kernels/losses.py",
        "            e_ny = tl.where(valid & (cols != y), e, 0.0)",
        "            e_ny = tl.where(valid & (cols != y + 1), e, 0.0)",
        ("tests/losses/test_ops.py", "-k", "kernel"),
    ),
    Mutation(
        "ignore-index",
        "cross_entropy: rows with label ignore_index + 1 ignored instead of ignore_index (off by one)",
        "regops/losses/_targets.py",
        "entry_ignored = index == ignore_index",
        "entry_ignored = index == ignore_index + 1",
        ("tests/losses/test_api.py", "tests/losses/test_semantics.py"),
    ),
    Mutation(
        "layer-norm-float32",
        "Triton dropout_add_layer_norm: float64 rows normalized in float32 (the wrong accumulation dtype)",
        "kernels/dropout_fused.py",
        "    compute = tl.float64 if x.dtype == tl.float64 else tl.float32\n    t = x.to(compute)\n"
        "    if HAS_DROPOUT:\n        keep = row_keep_tile",
        "    compute = tl.float32\n    t = x.to(compute)\n    if HAS_DROPOUT:\n        keep = row_keep_tile",
        ("tests/dropout/test_ops_fused.py", "-k", "layer_norm_kernel and triton"),
    ),
    Mutation(
        "probe-dot-term",
        "Triton Hutchinson accumulation: the first coordinate of every block left out of v . Hv",
        "kernels/hessian.py",
        "        prod = v * hv\n",
        "        prod = tl.where(tl.arange(0, BLOCK) == 0, 0.0, v * hv)\n",
        ("tests/hessian/test_ops.py", "-k", "probe_dot"),
    ),
    Mutation(
        "bias-norm-bf16",
        "per-example bias norms: the sum over tokens taken in the layer's bf16/fp16 (rounded before the norm)",
        "regops/per_example/_layers.py",
        "                g_sum = _sum_f32(g.reshape(g.shape[0], -1, g.shape[-1]), 1)",
        "                g_sum = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)",
        ("tests/per_example/test_models.py", "-k", "low_precision"),
    ),
    Mutation(
        "adamp-no-layer-view",
        "AdamP's projection: the layer view never tried (only scale invariance per row is projected)",
        "regops/optim/_adamp.py",
        "    layer = ~channel & (_cosine(tensors[:, 1:4], scale, eps) < delta / layout.sqrt_numel)",
        "    layer = ~channel & (_cosine(tensors[:, 1:4], scale, eps) < 0 * delta / layout.sqrt_numel)",
        ("tests/optim/test_semantics_adamp.py", "tests/optim/test_ops.py", "-k", "adamp"),
    ),
    Mutation(
        "stale-extension",
        "the C++ sources change after regops._C was built (an in-place build older than the checkout)",
        "csrc/mix/cpu.cpp",
        "#include <torch/library.h>\n",
        "#include <torch/library.h>\n// changed after the build\n",
        ("tests/test_extension_present.py",),
    ),
    Mutation(
        "no-extension",
        "an environment installed without regops._C on a machine with a C++ compiler",
        "regops/__init__.py",
        "",
        "",
        ("tests/test_extension_present.py", "tests/dropout/test_ops_cpp.py"),
        hide="regops/_C*.so",
    ),
    Mutation(
        "cpp-keep-threshold",
        "C++ (and CUDA) Philox keep: keep iff (word >> 1) >= threshold instead of > (off by one at the threshold)",
        "csrc/common/philox.cuh",
        "return static_cast<int32_t>(word >> 1) > threshold; }",
        "return static_cast<int32_t>(word >> 1) >= threshold; }",
        ("tests/dropout/test_ops.py", "-k", "kernel and cpp"),
        native=True,
    ),
    Mutation(
        "cpp-multi-sample-nan",
        "C++ multi-sample dropout: an Inf that some sample dropped stays Inf (torch gives NaN)",
        "csrc/dropout/cpu.cpp",
        "if (count[i] < num_samples && z != z) out = z;",
        "if (count[i] == 0 && z != z) out = z;",
        ("tests/dropout/test_semantics_specials.py", "-k", "multiply_nan and cpp"),
        native=True,
    ),
]


def _pytest(args: tuple[str, ...], env: dict[str, str]) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return proc.returncode, lines[-1] if lines else proc.stderr.strip()[-300:]


def _jit_env(cache: str) -> dict[str, str]:
    """An environment that builds regops._C from the checkout's (mutated) sources into ``cache`` and loads that."""
    env = {**os.environ, "REGOPS_EXT": "jit", "REGOPS_CACHE": cache}
    code = "import regops; print(regops.build_extension())"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    if proc.returncode != 0:
        raise RuntimeError(f"just-in-time build failed:\n{proc.stderr[-3000:]}")
    return env


def run(mutation: Mutation) -> dict[str, str]:
    path = ROOT / mutation.path
    original = path.read_text()
    if not mutation.hide and original.count(mutation.old) != 1:
        raise RuntimeError(f"{mutation.name}: the text to mutate occurs {original.count(mutation.old)}x in {path}")
    hidden = sorted(ROOT.glob(mutation.hide)) if mutation.hide else []
    if mutation.hide and not hidden:
        raise RuntimeError(f"{mutation.name}: nothing matches {mutation.hide}")
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as cache:
        aside = [(f, Path(cache) / f.name) for f in hidden]
        try:
            for f, tmp in aside:
                f.rename(tmp)
            if not mutation.hide:
                path.write_text(original.replace(mutation.old, mutation.new))
            env = _jit_env(cache) if mutation.native else dict(os.environ)
            code, summary = _pytest(mutation.tests, env)
        finally:
            path.write_text(original)
            for f, tmp in aside:
                if tmp.exists():
                    tmp.rename(f)
    status = "caught" if code == 1 else "NOT CAUGHT" if code == 0 else f"error (pytest exit {code})"
    return {"name": mutation.name, "status": status, "summary": summary, "s": f"{time.monotonic() - start:.0f}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="run only these mutations (by name)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:22s} {m.path:30s} {m.what}")
        return 0
    for selection in dict.fromkeys(m.tests for m in chosen):  # unmutated first: the selections must be green
        code, summary = _pytest(selection, dict(os.environ))
        if code != 0:
            print(f"unmutated tests fail, nothing to learn: {' '.join(selection)}: {summary}")
            return 2
    results = []
    for m in chosen:
        result = run(m)
        results.append(result)
        print(f"{result['status']:12s} {m.name:22s} ({result['s']} s) {' '.join(m.tests)}: {result['summary']}")
    return 0 if all(r["status"] == "caught" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
