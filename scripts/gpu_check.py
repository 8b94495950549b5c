"""Every kernel-backed op of the dropout, hessian and grad-norms families on one device, under each backend that
can run it there, against the reference on the CPU: masks and probes bit for bit, the rest within tolerance.

On a GPU (``--device cuda``): odd sizes, offsets near 2**31 and 2**32, a dropout of more than 2**31 elements,
shapes past CUDA's grid limits (probes of 2**27 parameters, T = 20000 ghost Gram, 16448 x 16448 instantiate),
a tensor on a non-current GPU when there are two, and CUDA-graph replays. With ``--small`` (the dry run on CPU
under the Triton interpreter) the same comparisons on small shapes. Used by scripts/gpu_check.sh.

    python scripts/gpu_check.py --device cuda --json out.json
    TRITON_INTERPRET=1 python scripts/gpu_check.py --device cpu --small
"""

# The closures below capture loop variables on purpose: Checker.run calls each one at once, inside its iteration.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable

import torch

import regops
from regops._core import rng as _rng
from regops.hessian import reference as ref_h

KEY = -1234567890123
OFFSETS = (12345, 2**31 - 2000, 2**32 - 3)
P = torch.tensor(0.3, dtype=torch.float64)  # the ops take p as a 0-dim tensor


class Checker:
    def __init__(self, device: torch.device, small: bool) -> None:
        self.device, self.small, self.results = device, small, []

    def run(self, name: str, fn: Callable[[str], None]) -> None:
        """``fn(backend)`` under each kernel backend. A backend that cannot run one of the check's ops on this device
        is recorded as skipped, with the reason dispatch gives (:class:`regops.BackendUnavailableError`)."""
        for backend in ("triton", "cuda"):
            start = time.perf_counter()
            try:
                with regops.use_backend(backend):
                    fn(backend)
                status, detail = "ok", ""
            except regops.BackendUnavailableError as exc:
                self.results.append({"check": name, "backend": backend, "status": "skip", "detail": str(exc)})
                continue
            except Exception as exc:  # reported, and the run fails at the end
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}"[:2000]
                traceback.print_exc()
            seconds = round(time.perf_counter() - start, 2)
            self.results.append({"check": name, "backend": backend, "status": status, "detail": detail, "s": seconds})
            print(f"{status:4} {backend:6} {name} ({seconds} s) {detail[:200]}", flush=True)


def seed(offset: int, device) -> torch.Tensor:
    return torch.tensor([KEY, offset], dtype=torch.int64, device=device)


def reference(fn, *args):
    """``fn`` on CPU copies of ``args`` with the reference backend."""
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    with regops.use_backend("torch"):
        return fn(*cpu)


def same(got, want, what: str) -> None:
    got, want = (
        (got if isinstance(got, tuple | list) else (got,)),
        (want if isinstance(want, tuple | list) else (want,)),
    )
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g is None and w is None:
            continue
        if not torch.equal(g.cpu(), w):
            diff = (g.cpu().double() != w.double()).sum().item()
            raise AssertionError(f"{what}: output {i} differs from the reference in {diff} of {w.numel()} elements")


def close(got, want, what: str, dtype: torch.dtype) -> None:
    tol = {torch.float64: 1e-9, torch.float32: 2e-4}.get(dtype, 3e-2)
    got, want = (
        (got if isinstance(got, tuple | list) else (got,)),
        (want if isinstance(want, tuple | list) else (want,)),
    )
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g is None and w is None:
            continue
        try:
            torch.testing.assert_close(g.cpu().double(), w.double(), rtol=tol, atol=tol)
        except AssertionError as exc:
            raise AssertionError(f"{what}: output {i}: {exc}") from None


def rand(shape, dtype, device, seed_: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_)
    return torch.randn(shape, generator=g).to(dtype).to(device)


# ------------------------------------------------------------------------------------------------ dropout family
def check_dropout(c: Checker) -> None:
    ops = torch.ops.regops
    dtypes = (
        (torch.float32, torch.bfloat16) if c.small else (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    )
    sizes = (1, 1000, 4097, 1 << 20)
    for dtype in dtypes:
        for n in ((1, 4097) if dtype == torch.float32 else (4097,)) if c.small else sizes:
            x = rand(n, dtype, c.device)
            for off in OFFSETS:
                s = seed(off, c.device)
                name = f"dropout {dtype} n={n} offset={off}"
                c.run(name, lambda b: same(ops.dropout(x, P, s), reference(ops.dropout, x, P, s), name))
                c.run(
                    "bitmask " + name,
                    lambda b: same(ops.dropout_bitmask(x, P, s), reference(ops.dropout_bitmask, x, P, s), name),
                )
                c.run(
                    "multi-sample " + name,
                    lambda b: same(
                        ops.multi_sample_dropout_mean(x, P, 3, s),
                        reference(ops.multi_sample_dropout_mean, x, P, 3, s),
                        name,
                    ),
                )
        x4 = rand((6, 5, 7, 3), dtype, c.device, 1)
        s = seed(OFFSETS[1], c.device)
        c.run(
            f"shared_dropout {dtype}",
            lambda b: same(
                ops.shared_dropout(x4, P, [6, 5, 1, 1], s),
                reference(ops.shared_dropout, x4, P, [6, 5, 1, 1], s),
                "shared",
            ),
        )
        c.run(
            f"drop_path {dtype}",
            lambda b: same(
                ops.drop_path(x4, x4, P, True, s), reference(ops.drop_path, x4, x4, P, True, s), "drop_path"
            ),
        )


def check_fused(c: Checker) -> None:
    ops = torch.ops.regops
    dtypes = (torch.float32, torch.bfloat16) if c.small else (torch.float32, torch.bfloat16, torch.float16)
    shapes = ((5, 37), (3, 300)) if c.small else ((5, 37), (33, 1000), (4, 4097), (3, 65536))
    for dtype in dtypes:
        for rows, cols in shapes:
            x, r = rand((rows, cols), dtype, c.device, 1), rand((rows, cols), dtype, c.device, 2)
            w, bias = rand(cols, dtype, c.device, 3), rand(cols, dtype, c.device, 4)
            s = seed(OFFSETS[1], c.device)
            name = f"{dtype} {rows}x{cols}"

            def bda(b, x=x, r=r, bias=bias, s=s, name=name):
                same(ops.bias_dropout_add(x, bias, r, P, s), reference(ops.bias_dropout_add, x, bias, r, P, s), name)
                got = ops.bias_dropout_add_backward(r, True, P, s)
                want = reference(ops.bias_dropout_add_backward, r, True, P, s)
                same(got[0], want[0], name + " dx")
                close(got[1], want[1], name + " dbias", torch.float32)

            c.run("bias_dropout_add " + name, bda)
            for rms in (False, True):

                def daln(b, x=x, r=r, w=w, bias=bias, s=s, rms=rms, name=name, dtype=dtype):
                    args = (x, r, w, bias, P, 1e-5, rms, True, s)
                    got, want = ops.dropout_add_layer_norm(*args), reference(ops.dropout_add_layer_norm, *args)
                    same(got[1], want[1], name + " pre-norm sum")
                    close(got, want, name, dtype)
                    dy = rand((rows, cols), dtype, c.device, 5)
                    bwd = (dy, got[1], got[1], got[2], got[3], w, True, P, rms, s, dtype, dtype)
                    close(
                        ops.dropout_add_layer_norm_backward(*bwd),
                        reference(ops.dropout_add_layer_norm_backward, *bwd),
                        name,
                        dtype,
                    )

                c.run(f"dropout_add_{'rms' if rms else 'layer'}_norm {name}", daln)


def check_dropout_past_2_pow_31(c: Checker) -> None:
    """One dropout of 2**31 + 4099 half-precision elements: its first and last 8192 outputs against the reference
    (a slice starting at element 4k of a call at offset o is the call at offset o + k)."""
    n = 2**31 + 4099
    x = torch.randn(n, dtype=torch.float16, device=c.device)
    s = seed(OFFSETS[1], c.device)

    def run(b):
        y = torch.ops.regops.dropout(x, P, s)
        for start in (0, (n - 8192) // 4 * 4):  # multiples of 4: whole counters
            s2 = torch.tensor([KEY, OFFSETS[1] + start // 4])
            want = reference(torch.ops.regops.dropout, x[start : start + 8192], P, s2)
            same(y[start : start + 8192], want, f"elements {start}..")

    c.run("dropout of 2**31 + 4099 elements", run)


# ------------------------------------------------------------------------------------------------ hessian
def check_hessian(c: Checker) -> None:
    for dist in ("rademacher", "gaussian"):
        for dtype in (torch.float32, torch.bfloat16):
            for numel in (1, 4097) if c.small else (1, 1000, 4097):
                s = seed(OFFSETS[2], c.device)
                name = f"probes {dist} {dtype} numel={numel}"
                c.run(
                    name,
                    lambda b, s=s, numel=numel, dtype=dtype, dist=dist, name=name: same(
                        torch.ops.regops.hessian_probes(s, 3, 5, numel, dist, dtype),
                        reference(torch.ops.regops.hessian_probes, s, 3, 5, numel, dist, dtype),
                        name,
                    ),
                )
    if not c.small:  # 2**27 columns: 131072 blocks of 1024, past grid y in the old layout
        numel = 2**27
        for dist in ("rademacher", "gaussian"):

            def big(b, dist=dist):
                got = torch.ops.regops.hessian_probes(seed(5, c.device), 0, 2, numel, dist, torch.float32)
                stride, epc = got.shape[1], ref_h.ELEMENTS_PER_COUNTER[dist]
                rc = stride // epc
                for k in range(2):
                    for c0 in (0, stride - 4096):
                        want = ref_h.probes(seed(5 + k * rc + c0 // epc, "cpu"), 0, 1, 4096, dist, torch.float32)
                        same(got[k, c0 : c0 + 4096], want[0, :4096], f"row {k} columns {c0}..")

            c.run(f"probes {dist} of 2**27 parameters", big)
    shapes = [(1,), (7, 9), (1000,), (4097,)]
    for dtype in (torch.float32, torch.bfloat16):
        vs = [rand((3, *sh), dtype, c.device, i) for i, sh in enumerate(shapes)]
        hs = [rand((3, *sh), dtype, c.device, 10 + i) for i, sh in enumerate(shapes)]

        def dot(b, vs=vs, hs=hs, dtype=dtype):
            got = torch.ops.regops.hessian_probe_dot(vs, hs, True)
            again = torch.ops.regops.hessian_probe_dot(vs, hs, True)
            same(got, tuple(t.cpu() for t in again), "run-to-run determinism")
            close(got, reference(torch.ops.regops.hessian_probe_dot, vs, hs, True), "probe_dot", dtype)

        c.run(f"probe_dot {dtype}", dot)


# ------------------------------------------------------------------------------------------------ grad norms
def _instantiate_ref(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    a, g = a.cpu().double(), g.cpu().double()
    return torch.einsum("btp,btd->bpd", g, a).pow(2).sum((1, 2))


def check_grad_norms(c: Checker) -> None:
    ops = torch.ops.regops
    cases = [(3, 37, 20, 9)] if c.small else [(3, 37, 20, 9), (4, 1000, 256, 96), (1, 20000, 8, 8)]
    for dtype in (torch.float32, torch.bfloat16):
        for b, t, d, p in cases:
            a, g = rand((b, t, d), dtype, c.device, 1), rand((b, t, p), dtype, c.device, 2)
            want = _instantiate_ref(a, g)
            name = f"{dtype} B={b} T={t} d={d} p={p}"
            c.run(
                "ghost gram " + name,
                lambda bk, a=a, g=g, w=want: close(ops.grad_norms_gram(a, g), w.float(), "gram", dtype),
            )
            c.run(
                "instantiate " + name,
                lambda bk, a=a, g=g, w=want: close(ops.grad_norms_instantiate(a, g), w.float(), "instantiate", dtype),
            )
            ids = torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(3)).to(c.device)

            def emb(bk, ids=ids, g=g, b=b):
                gd, idc = g.cpu().double(), ids.cpu()
                want = torch.stack(
                    [
                        torch.zeros(50, gd.shape[2], dtype=torch.float64).index_add_(0, idc[n], gd[n])[1:].pow(2).sum()
                        for n in range(b)
                    ]
                )
                close(ops.grad_norms_embedding_gram(ids, g, 0), want.float(), "embedding gram", dtype)

            c.run("embedding gram " + name, emb)
    if not c.small:  # one 16448 x 16448 Linear: 66049 instantiate tiles, past grid y in the old layout
        a, g = rand((1, 2, 16448), torch.bfloat16, c.device, 4), rand((1, 2, 16448), torch.bfloat16, c.device, 5)
        aa, gg = a[0].double().cpu(), g[0].double().cpu()
        want = ((aa @ aa.T) * (gg @ gg.T)).sum().reshape(1).float()
        c.run(
            "instantiate 16448x16448",
            lambda bk: close(ops.grad_norms_instantiate(a, g), want, "big", torch.bfloat16),
        )


# ------------------------------------------------------------------------------------------------ GPU only
def check_non_current_device(c: Checker) -> None:
    other = torch.device("cuda", 1)
    x = rand((33, 1000), torch.float32, other)
    s = seed(OFFSETS[1], other)

    def run(b):
        with torch.cuda.device(0):
            same(torch.ops.regops.dropout(x, P, s), reference(torch.ops.regops.dropout, x, P, s), "dropout on cuda:1")
            got = torch.ops.regops.dropout_add_layer_norm(x, x, None, None, P, 1e-5, False, False, s)
            assert got[0].device == other
            close(
                got,
                reference(torch.ops.regops.dropout_add_layer_norm, x, x, None, None, P, 1e-5, False, False, s),
                "daln",
                torch.float32,
            )

    c.run("tensors on cuda:1 while cuda:0 is current", run)


def check_cuda_graphs(c: Checker) -> None:
    x = rand(100_000, torch.float32, c.device)

    def run(b):
        for _ in range(2):
            regops.dropout(x, P)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s = _rng.philox_seed(x.device, x.numel())
            y = torch.ops.regops.dropout(x, P, s)
        seen = []
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            same(y, reference(torch.ops.regops.dropout, x, P, s), "replay")
            seen.append(s.cpu().clone())
        assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2]), "replays reused the seed"

    c.run("dropout under CUDA-graph replays", run)

    vs = [rand((2, 5000), torch.float32, c.device, 1)]
    hs = [rand((2, 5000), torch.float32, c.device, 2)]

    def accumulate(b):
        torch.ops.regops.hessian_probe_dot(vs, hs, True)  # warm-up builds the tables
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch.ops.regops.hessian_probe_dot(vs, hs, True)
        graph.replay()
        torch.cuda.synchronize()
        close(out, reference(torch.ops.regops.hessian_probe_dot, vs, hs, True), "probe_dot replay", torch.float32)
        fresh = [v.clone() for v in vs]
        try:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                torch.ops.regops.hessian_probe_dot(fresh, hs, True)
        except RuntimeError as exc:
            assert "capture" in str(exc), exc
        else:
            raise AssertionError("new tensors under capture should raise a clear error")

    c.run("hessian_probe_dot under CUDA-graph capture", accumulate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small shapes only (the interpreter's dry run)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    c = Checker(device, args.small or device.type == "cpu")
    checks = [check_dropout, check_fused, check_hessian, check_grad_norms]
    if device.type == "cuda":
        checks += [check_dropout_past_2_pow_31, check_cuda_graphs]
        if torch.cuda.device_count() > 1:
            checks.append(check_non_current_device)
    for check in checks:
        with contextlib.suppress(KeyboardInterrupt):
            check(c)
    failed = [r for r in c.results if r["status"] == "FAIL"]
    ok = sum(r["status"] == "ok" for r in c.results)
    print(
        f"gpu_check comparisons on {device}: {ok} ok, {len(failed)} failed, "
        f"{sum(r['status'] == 'skip' for r in c.results)} skipped"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "small": c.small, "results": c.results}, f, indent=1)
    return 1 if failed or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
