"""The CPU bar of the C++ kernels: fp32, 4M elements ([4096, 1024]), forward+backward, regops against the eager
composition a user would write and its ``torch.compile``; then forward-only cases (nested dropout, Hessian probes,
the mixing op), each against the eager torch ops it replaces, their ``torch.compile`` and the reference.

Every variant is timed interleaved with the others (a loaded machine slows all alike), ``--rounds`` rounds of
``--reps`` calls each; the median and the minimum over all timed calls are reported, as the harness does, and the
run (every call's time included) is appended to ``benchmarks/results/<device>/cpu_bar.json``.

    python -m benchmarks.cpu_bar --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import regops
from benchmarks import harness
from regops._core import dispatch, extension

P = 0.1


def _backward_cases(rows: int, cols: int):
    """name -> {variant: callable}, each callable a forward + backward with the same upstream gradient."""
    x, r = torch.randn(rows, cols, requires_grad=True), torch.randn(rows, cols, requires_grad=True)
    b, w, lb = (torch.randn(cols, requires_grad=True) for _ in range(3))
    g = torch.randn(rows, cols)
    leaves = (x, r, b, w, lb)

    def eager_dropout(x):
        return F.dropout(x, P)

    def eager_bda(x, b, r):
        return r + F.dropout(x + b, P)

    def eager_daln(x, r, w, lb):
        return F.layer_norm(F.dropout(x, P) + r, (cols,), w, lb)

    compiled = {f: harness.compiled(f) for f in (eager_dropout, eager_bda, eager_daln)}
    cases = {
        "dropout": {
            "eager": lambda: eager_dropout(x).backward(g),
            "compile": lambda: compiled[eager_dropout](x).backward(g),
            "regops": lambda: regops.dropout(x, P).backward(g),
        },
        "bias_dropout_add": {
            "eager": lambda: eager_bda(x, b, r).backward(g),
            "compile": lambda: compiled[eager_bda](x, b, r).backward(g),
            "regops": lambda: regops.bias_dropout_add(x, b, r, P).backward(g),
        },
        "dropout_add_layer_norm": {
            "eager": lambda: eager_daln(x, r, w, lb).backward(g),
            "compile": lambda: compiled[eager_daln](x, r, w, lb).backward(g),
            "regops": lambda: regops.dropout_add_layer_norm(x, r, w, lb, P).backward(g),
        },
    }
    return leaves, cases


def _forward_cases():
    """name -> {variant: callable}: the torch ops a user writes for it ("eager"), their compile, the reference and
    regops' C++ kernel; ~4M float32 outputs each."""
    from regops.dropout import reference as rref
    from regops.hessian import ops as hops
    from regops.hessian import reference as href
    from regops.mix import reference as mref

    k, n = 4, 1 << 20
    seed = torch.tensor([7, 11])
    x = torch.randn(32, 3, 208, 208)
    b = x.shape[0]
    lam = torch.full((b,), 0.7)
    partner = torch.arange(b - 1, -1, -1)
    no_box = torch.zeros(b, 4, dtype=torch.long)
    box = torch.tensor([[20, 120, 30, 150]] * b)

    def eager_mixup():
        return x * 0.7 + x.flip(0) * 0.3

    def eager_cutmix():
        y = x * 0.7 + x.flip(0) * 0.3
        y[:, :, 20:120, 30:150] = x.flip(0)[:, :, 20:120, 30:150]
        return y

    h = torch.randn(4096, 1024)

    def eager_nested():
        counts = torch.randint(1, h.shape[1] + 1, (h.shape[0], 1))
        return h * (torch.arange(h.shape[1]) < counts)

    def eager_gaussian():
        return torch.randn(k, n)

    def eager_rademacher():  # what a user writes: the draw in the target dtype, then the affine map
        return torch.randint(0, 2, (k, n), dtype=torch.float32) * 2 - 1

    def eager_rademacher_bernoulli():
        return torch.empty(k, n).bernoulli_(0.5) * 2 - 1

    def with_compile(eager, **others):
        return {"eager": eager, "compile": harness.compiled(eager), **others}

    return {
        "nested_dropout": with_compile(
            eager_nested,
            reference=lambda: rref.nested_dropout(h, torch.tensor(0.01, dtype=torch.float64), 1, seed),
            regops=lambda: regops.nested_dropout(h, 0.01, dim=1),
        ),
        "probes gaussian": with_compile(
            eager_gaussian,
            reference=lambda: href.probes(seed, 0, k, n, "gaussian", torch.float32),
            regops=lambda: hops.hessian_probes(seed, 0, k, n, "gaussian", torch.float32),
        ),
        "probes rademacher": with_compile(
            eager_rademacher,
            **{"eager bernoulli": eager_rademacher_bernoulli},
            reference=lambda: href.probes(seed, 0, k, n, "rademacher", torch.float32),
            regops=lambda: hops.hessian_probes(seed, 0, k, n, "rademacher", torch.float32),
        ),
        "mix_apply mixup": with_compile(
            eager_mixup,
            reference=lambda: mref.mix_apply(x, lam, 1 - lam, partner, no_box),
            regops=lambda: torch.ops.regops.mix_apply(x, lam, 1 - lam, partner, no_box),
        ),
        "mix_apply cutmix box": with_compile(
            eager_cutmix,
            reference=lambda: mref.mix_apply(x, lam, 1 - lam, partner, box),
            regops=lambda: torch.ops.regops.mix_apply(x, lam, 1 - lam, partner, box),
        ),
    }


def measure(variants: dict, leaves=(), rounds: int = 6, reps: int = 5, slow: tuple[str, ...] = ()) -> dict:
    """Seconds of every call: one warm-up call each (compiles), then ``rounds`` rounds in which every variant makes
    ``reps`` calls in turn (``slow`` variants: one call)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(1 if name in slow else reps):
                for t in leaves:
                    t.grad = None
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def _row(case: str, threads: int, times: dict[str, list[float]]) -> list[dict]:
    eager_med, eager_min = statistics.median(times["eager"]), min(times["eager"])
    rows = []
    for name, seconds in times.items():
        med, low = statistics.median(seconds), min(seconds)
        rows.append({
            "case": case, "threads": threads, "variant": name, "ms": 1e3 * med, "ms_min": 1e3 * low,
            "rounds": len(seconds), "ms_all": [round(1e3 * t, 3) for t in seconds],
            "x_eager_median": med / eager_med, "x_eager_min": low / eager_min,
        })  # fmt: skip
    text = "  ".join(f"{r['variant']} {r['ms']:.2f}/{r['ms_min']:.2f}" for r in rows)
    print(f"threads={threads} {case:24s} ms median/min: {text}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=5, help="calls per variant per round")
    parser.add_argument("--only", nargs="+", default=None, help="run only the cases whose name contains one of these")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to cpu_bar.json")
    args = parser.parse_args(argv)
    backend = dispatch.choose("dropout", torch.device("cpu"))
    print(f"regops._C: {extension.status()}; dropout on CPU runs the {backend!r} backend")
    leaves, cases = _backward_cases(4096, 1024)
    forward = _forward_cases()
    rows: list[dict] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, variants in {**cases, **forward}.items():
            if args.only and not any(w in name for w in args.only):
                continue
            fwd_only = name in forward
            times = measure(
                variants,
                () if fwd_only else leaves,
                args.rounds,
                args.reps if not fwd_only else max(1, args.reps - 2),
                slow=("reference",),
            )
            rows += _row(name, threads, times)
    if not args.no_record:
        env = harness.environment(torch.device("cpu"), ["python", "-m", "benchmarks.cpu_bar", *(argv or [])])
        env["backend"] = backend
        run = {"environment": env, "rounds": args.rounds, "reps": args.reps, "results": rows}
        print(f"appended to {harness.record(harness.result_path('cpu_bar'), run)}")
    return rows


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
