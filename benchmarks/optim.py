"""Optimizer-side regularization: regops.optim's multi-tensor steps against the per-tensor Python versions they
replace (the reference SAM loop, Grokfast's EMA loop, timm's adaptive gradient clipping, a clamp per tensor, an EWC
loss term through autograd, the authors' AdamP) and torch's fused AdamW, for 10, 200 and 2,000 parameter tensors.

``python -m benchmarks --family optim`` runs the registered cases through the harness. ``python -m
benchmarks.optim`` is the paired comparison: the variants of a case timed in interleaved rounds (a shared
machine's load hits all of them alike; min and median reported), with the number of operators each step dispatches
(on a GPU, about one kernel launch each), written to ``results/<device>/optim-paired.json``. The step is timed
alone: gradients are set once and reused, so forward and backward are not part of it.
"""

from __future__ import annotations

import torch

import regops
from benchmarks.harness import Setup, case
from regops.testing import ReferenceSAM

COUNTS = (10, 200, 2000)
WIDTH = 64  # tensors alternate [WIDTH, WIDTH] weights and [WIDTH] biases: many small tensors, as in real models
LR, RHO, WD = 1e-3, 0.05, 0.01
GROKFAST, AGC, CLIP = (0.98, 2.0), 0.01, 0.5


def _params(n: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(WIDTH, WIDTH) if k % 2 == 0 else (WIDTH,) for k in range(n)]
    params = [torch.randn(s, generator=g, device=device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-2
    return params


def _numel(params: list[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def _sam_step(opt):
    def run():
        opt.first_step()
        opt.second_step()

    return run


def sam_variants(n: int, device: torch.device) -> tuple[dict, int]:
    """SAM with SGD (momentum 0.9): one first and one second step."""
    kw = dict(lr=LR, momentum=0.9)
    variants = {
        "regops": _sam_step(regops.optim.SAM(_params(n, device), regops.optim.SGD, rho=RHO, **kw)),
        "regops SAM + torch SGD": _sam_step(regops.optim.SAM(_params(n, device), torch.optim.SGD, rho=RHO, **kw)),
        "eager": _sam_step(ReferenceSAM(_params(n, device), torch.optim.SGD, rho=RHO, **kw)),
    }
    # norm: read g; perturb: read w, g, write w, w0; restore + SGD: read w0, g, buf, write w, buf
    return variants, 10 * _numel(_params(n, device)) * 4


def _extras_eager(params, ema, adaptive_clip_grad):
    """The extras as their published per-tensor versions: timm's adaptive_clip_grad, a clamp per tensor, Grokfast's
    EMA filter (ironjr/grokfast gradfilter_ema)."""
    adaptive_clip_grad(params, clip_factor=AGC)
    for p in params:
        p.grad.clamp_(-CLIP, CLIP)
    alpha, lamb = GROKFAST
    for k, p in enumerate(params):
        ema[k] = ema[k] * alpha + p.grad.detach() * (1 - alpha) if k in ema else p.grad.detach().clone()
        p.grad.data = p.grad.data + ema[k] * lamb


def adamw_variants(n: int, device: torch.device) -> tuple[dict, int]:
    """AdamW with adaptive clipping, coordinate clipping and Grokfast, and plain AdamW for reference."""
    from timm.utils.agc import adaptive_clip_grad  # the peer (a missing one skips the eager variant)

    fused = device.type in ("cpu", "cuda")
    extras = dict(agc=AGC, clip_coord=CLIP, grokfast=GROKFAST)
    ours = regops.optim.AdamW(_params(n, device), lr=LR, weight_decay=WD, **extras)
    plain_ours = regops.optim.AdamW(_params(n, device), lr=LR, weight_decay=WD)
    ps = _params(n, device)
    torch_fused = torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=fused)
    torch_plain = torch.optim.AdamW(_params(n, device), lr=LR, weight_decay=WD, fused=fused)
    ema: dict = {}
    grads = [p.grad for p in ps]

    def eager():
        for p, g in zip(ps, grads, strict=True):  # Grokfast rebinds .grad: every step starts from these
            p.grad = g
        _extras_eager(ps, ema, adaptive_clip_grad)
        torch_fused.step()

    variants = {
        "regops": ours.step,
        "eager": eager,
        "regops AdamW (no extras)": plain_ours.step,
        "torch fused AdamW (no extras)": torch_plain.step,
    }
    # agc norms: read w, g; step: read w, g, m, v, ema, write w, m, v, ema
    return variants, 11 * _numel(ps) * 4


def ewc_variants(n: int, device: torch.device) -> tuple[dict, int]:
    """EWC: regops' decay in the step, against the penalty as a loss term (its backward) and torch's fused Adam."""
    ours_p = _params(n, device)
    anchors = [p.detach() + 0.01 for p in ours_p]
    fisher = [torch.rand_like(p) for p in ours_p]
    ours = regops.optim.AdamW(ours_p, lr=LR, weight_decay=WD, decay="ewc", anchor=anchors, fisher=fisher)
    ps = _params(n, device)
    opt = torch.optim.Adam(ps, lr=LR, fused=device.type in ("cpu", "cuda"))

    def eager():
        penalty = WD / 2 * sum((f * (p - a) ** 2).sum() for p, a, f in zip(ps, anchors, fisher, strict=True))
        penalty.backward()
        opt.step()

    return {"regops": ours.step, "eager": eager}, 10 * _numel(ps) * 4


def adamp_variants(n: int, device: torch.device) -> tuple[dict, int]:
    """AdamP: regops' AdamW(adamp=True) against the authors' per-tensor AdamP (``adamp``), and plain AdamW."""
    from adamp import AdamP  # the peer (a missing one skips the eager variant)

    ours = regops.optim.AdamW(_params(n, device), lr=LR, weight_decay=WD, adamp=True)
    plain = regops.optim.AdamW(_params(n, device), lr=LR, weight_decay=WD)
    ps = _params(n, device)
    eager = AdamP(ps, lr=LR, weight_decay=WD)
    variants = {"regops": ours.step, "eager": eager.step, "regops AdamW (no projection)": plain.step}
    # row sums: read g, w; step: read g, m, v, write m, v, update; row sums: read update, w; projection: read w,
    # update, write w (the matrices; the vectors take the one-pass step)
    return variants, 13 * _numel(ps) * 4


CASES = {
    "sam step": sam_variants,
    "adamw+agc+clip+grokfast step": adamw_variants,
    "ewc step": ewc_variants,
    "adamw+adamp step": adamp_variants,
}


def _register() -> None:
    for name, variants in CASES.items():
        for n in COUNTS:

            def make(device, quick, n=n, variants=variants):
                if quick and n > 200:
                    return None
                fns, nbytes = variants(n, device)
                return Setup(fns, bytes=nbytes, note=f"{n} tensors, step only (gradients reused)")

            case("optim", name, f"{n} tensors")(make)


_register()


# ------------------------------------------------------------------------------------------ paired timing
def dispatched_ops(fn) -> int:
    """Operators one call dispatches (aten and regops ops; on a GPU each is about one kernel launch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def paired(n: int, builder, rounds: int, device: torch.device) -> dict:
    """The variants of one case timed back to back in ``rounds`` interleaved rounds: min and median per step."""
    import statistics
    import time

    fns, _ = builder(n, device)
    for fn in fns.values():  # warm up: states, caches, the extension
        for _ in range(3):
            fn()
    reps = {}
    for name, fn in fns.items():  # steps per timed sample: about 20 ms of work
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / reps[name])
    out = {}
    for name, fn in fns.items():
        out[name] = {
            "min_ms": min(times[name]) * 1e3,
            "median_ms": statistics.median(times[name]) * 1e3,
            "ops_per_step": dispatched_ops(fn),
            "steps_per_sample": reps[name],
        }
    for row in out.values():
        row["vs_eager_min"] = row["min_ms"] / out["eager"]["min_ms"]
        row["vs_eager_median"] = row["median_ms"] / out["eager"]["median_ms"]
    return out


def main() -> None:
    import argparse
    import json

    from benchmarks.harness import RESULTS_DIR, device_slug, environment

    parser = argparse.ArgumentParser(description="paired optimizer-step timings: regops.optim vs per-tensor loops")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--counts", type=int, nargs="*", default=list(COUNTS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {"environment": environment(device), "rounds": args.rounds, "width": WIDTH, "cases": {}}
    for name, builder in CASES.items():
        for n in args.counts:
            rows = paired(n, builder, args.rounds if n < 2000 else max(5, args.rounds // 2), device)
            result["cases"][f"{name}, {n} tensors"] = rows
            for variant, r in rows.items():
                print(
                    f"{name:30s} {n:5d} tensors  {variant:30s} min {r['min_ms']:8.3f} ms  median {r['median_ms']:8.3f}"
                    f" ms  x{r['vs_eager_min']:.3f} (min) x{r['vs_eager_median']:.3f} (median) of eager  "
                    f"{r['ops_per_step']:6d} ops",
                    flush=True,
                )
    out = RESULTS_DIR / device_slug(device) / "optim-paired.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
