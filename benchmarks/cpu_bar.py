"""The CPU bar of the C++ kernels: fp32, 4M elements ([4096, 1024]), forward+backward, regops against the eager
composition, min of interleaved runs (a loaded machine inflates both sides; the minimum is the least disturbed).
Then forward-only cases (nested dropout, Hessian probes, the mixing op), each against the eager torch ops it replaces
and the reference.

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


def _forward_cases():
    """name -> (torch op it replaces, reference, regops C++ kernel), ~4M float32 outputs each."""
    from regops.reference import dropout as rref
    from regops.reference import hessian as href
    from regops.reference import mix as mref

    cpu = torch.device("cpu")
    k, n = 4, 1 << 20
    probes = torch.ops.regops.hessian_probes
    seed = torch.tensor([7, 11])
    x = torch.randn(32, 3, 208, 208)
    b = x.shape[0]
    lam = torch.full((b,), 0.7)
    partner = torch.arange(b - 1, -1, -1)
    no_box = torch.zeros(b, 4, dtype=torch.long)
    box = torch.tensor([[20, 120, 30, 150]] * b)

    def eager_cutmix():
        y = x * 0.7 + x.flip(0) * 0.3
        y[:, :, 20:120, 30:150] = x.flip(0)[:, :, 20:120, 30:150]
        return y

    h = torch.randn(4096, 1024)

    def eager_nested():
        counts = torch.randint(1, h.shape[1] + 1, (h.shape[0], 1))
        return h * (torch.arange(h.shape[1]) < counts)

    return {
        "nested_dropout": (
            eager_nested,
            lambda: rref.nested_dropout(h, 0.01, 1, 7, 11),
            lambda: regops.nested_dropout(h, 0.01, dim=1),
        ),
        "probes gaussian": (
            lambda: torch.randn(k, n),
            lambda: href.probes(7, 11, 0, k, n, "gaussian", torch.float32, cpu),
            lambda: probes(seed, 0, k, n, "gaussian", torch.float32, cpu),
        ),
        "probes rademacher": (
            lambda: torch.randint(0, 2, (k, n), dtype=torch.float32).mul_(2).sub_(1),
            lambda: href.probes(7, 11, 0, k, n, "rademacher", torch.float32, cpu),
            lambda: probes(seed, 0, k, n, "rademacher", torch.float32, cpu),
        ),
        "mix_apply mixup": (
            lambda: x * 0.7 + x.flip(0) * 0.3,
            lambda: mref.mix_apply(x, lam, 1 - lam, partner, no_box),
            lambda: torch.ops.regops.mix_apply(x, lam, 1 - lam, partner, no_box),
        ),
        "mix_apply cutmix box": (
            eager_cutmix,
            lambda: mref.mix_apply(x, lam, 1 - lam, partner, box),
            lambda: torch.ops.regops.mix_apply(x, lam, 1 - lam, partner, box),
        ),
    }


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
    parser.add_argument("--only", nargs="+", default=None, help="run only the cases whose name contains one of these")
    args = parser.parse_args()
    leaves, cases = _cases(4096, 1024)
    backend = regops._backend.choose("dropout", torch.device("cpu"))
    print(f"regops._C: {regops._backend.extension_status()}; dropout on CPU runs the {backend!r} backend")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, (eager, ours) in cases.items():
            if args.only and not any(w in name for w in args.only):
                continue
            e = o = float("inf")
            for _ in range(args.rounds):
                e = min(e, _min_ms(eager, leaves, 5))
                o = min(o, _min_ms(ours, leaves, 5))
            print(f"threads={threads} {name:24s} eager {e:7.2f} ms  regops {o:7.2f} ms  ratio {o / e:.2f}", flush=True)
        for name, (eager, reference, ours) in _forward_cases().items():
            if args.only and not any(w in name for w in args.only):
                continue
            e = r = o = float("inf")
            for _ in range(args.rounds):
                e = min(e, _min_ms(eager, (), 3))
                r = min(r, _min_ms(reference, (), 1))
                o = min(o, _min_ms(ours, (), 3))
            print(
                f"threads={threads} {name:24s} torch {e:7.2f} ms  reference {r:7.2f} ms  regops {o:7.2f} ms  "
                f"ratio to torch {o / e:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
