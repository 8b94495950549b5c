"""The CPU bar of the C++ kernels: fp32, 4M elements ([4096, 1024]), forward+backward, regops against the eager
composition, min of interleaved runs (a loaded machine inflates both sides; the minimum is the least disturbed).

    python -m benchmarks.cpu_bar --threads 1 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import regops

P = 0.1


def _cases(rows: int, cols: int):
    x, r = torch.randn(rows, cols, requires_grad=True), torch.randn(rows, cols, requires_grad=True)
    b, w, lb = (torch.randn(cols, requires_grad=True) for _ in range(3))
    g = torch.randn(rows, cols)
    leaves = (x, r, b, w, lb)
    cases = {
        "dropout": (lambda: F.dropout(x, P).backward(g), lambda: regops.dropout(x, P).backward(g)),
        "bias_dropout_add": (
            lambda: (r + F.dropout(x + b, P)).backward(g),
            lambda: regops.bias_dropout_add(x, b, r, P).backward(g),
        ),
        "dropout_add_layer_norm": (
            lambda: F.layer_norm(F.dropout(x, P) + r, (cols,), w, lb).backward(g),
            lambda: regops.dropout_add_layer_norm(x, r, w, lb, P).backward(g),
        ),
    }
    return leaves, cases


def _min_ms(fn, leaves, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    leaves, cases = _cases(4096, 1024)
    backend = regops._backend.choose("dropout", torch.device("cpu"))
    print(f"regops._C: {regops._backend.extension_status()}; dropout on CPU runs the {backend!r} backend")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, (eager, ours) in cases.items():
            e = o = float("inf")
            for _ in range(args.rounds):
                e = min(e, _min_ms(eager, leaves, 5))
                o = min(o, _min_ms(ours, leaves, 5))
            print(f"threads={threads} {name:24s} eager {e:7.2f} ms  regops {o:7.2f} ms  ratio {o / e:.2f}", flush=True)


if __name__ == "__main__":
    main()
