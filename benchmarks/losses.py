"""Losses: regops' fused regularized cross-entropy and linear cross-entropy against PyTorch, its torch.compile,
the eager composition of the regularizers, and Liger-Kernel / Cut Cross-Entropy where they run (their kernels are
Triton for CUDA: on a CPU their rows say so; a missing install is reported by its row too).

Cases (CPU sizes are the CPU bars': 4096 x 32000 fp32 with label smoothing + z-loss; linear CE at 8192 rows,
hidden 512, V = 32000; GPU sizes: 8192 x 32000 and 4096 x 128256 bf16, linear CE at hidden 2048 and Cut
Cross-Entropy's Gemma-2-2B head, hidden 2304, V = 256000, 8192 tokens):

* ``cross_entropy ls+z fwd+bwd``: regops vs ``F.cross_entropy(label_smoothing=0.1)`` alone (the bar's baseline),
  the eager composition ``CE(ls) + z * lse^2`` and its ``torch.compile``, Liger's cross-entropy;
* ``cross_entropy regularizers fwd+bwd``: what each regularizer (and the statistics) adds to plain fused CE;
* ``linear_cross_entropy fwd+bwd``: regops vs ``F.linear`` + ``F.cross_entropy`` (and compiled), Liger's fused
  linear CE, Cut Cross-Entropy;
* ``mix_cross_entropy fwd+bwd``: regops from index labels vs timm's dense targets + SoftTargetCrossEntropy vs
  eager ``lam * F.cross_entropy(z, a) + (1 - lam) * F.cross_entropy(z, b)`` (B=256, C=21843 on CPU);
* ``soft_target_cross_entropy fwd+bwd`` and ``mix_binary_cross_entropy fwd+bwd`` against timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import regops
from benchmarks import harness
from benchmarks.harness import Setup, case, compiled

CE_SIZES = {  # (device type, quick) -> [(rows, V, dtype)]
    ("cpu", False): [(4096, 32000, torch.float32)],
    ("cpu", True): [(256, 4096, torch.float32)],
    ("cuda", False): [(8192, 32000, torch.bfloat16), (4096, 128256, torch.bfloat16)],
    ("cuda", True): [(2048, 32000, torch.bfloat16)],
}
LCE_SIZES = {  # (device type, quick) -> [(rows, hidden, V, dtype)]
    ("cpu", False): [(8192, 512, 32000, torch.float32)],
    ("cpu", True): [(512, 128, 4096, torch.float32)],
    ("cuda", False): [
        (8192, 2048, 32000, torch.bfloat16),
        (8192, 2048, 128256, torch.bfloat16),
        (8192, 2304, 256000, torch.bfloat16),  # Cut Cross-Entropy's Gemma-2-2B setup
    ],
    ("cuda", True): [(2048, 1024, 32000, torch.bfloat16)],
}
MIX_LOGITS = {  # (device type, quick) -> [(B, C)]: the MixUp / CutMix losses (CPU bar: B=256, C=21843)
    ("cpu", False): [(256, 21843)],
    ("cpu", True): [(64, 2048)],
    ("cuda", False): [(1024, 21843)],
    ("cuda", True): [(256, 4096)],
}
SMOOTHING, Z_LOSS = 0.1, 1e-4


GPU_ONLY = "{} runs Triton kernels written for CUDA GPUs: not on {}"


def _gpu_peers(device: torch.device, names: list[str]) -> dict[str, str]:
    """The peers whose kernels cannot run on ``device``, with the reason (reported as rows, never dropped)."""
    return {} if device.type == "cuda" else {name: GPU_ONLY.format(name, device.type) for name in names}


def _register(name: str, make, sizes: dict, label) -> None:
    for quick in (False, True):
        for device_type in ("cpu", "cuda"):
            for shape in sizes[(device_type, quick)]:
                params = label(shape) + (" quick" if quick else "")

                def factory(device, is_quick, quick=quick, device_type=device_type, shape=shape):
                    if is_quick != quick or device.type != device_type:
                        return None
                    return make(shape, device)

                case("losses", name, params, devices=(device_type,))(factory)


def _ce_label(shape) -> str:
    rows, vocab, dtype = shape
    return f"rows={rows} V={vocab} dtype={str(dtype).removeprefix('torch.')}"


def _lce_label(shape) -> str:
    rows, hidden, vocab, dtype = shape
    return f"rows={rows} H={hidden} V={vocab} dtype={str(dtype).removeprefix('torch.')}"


def _fwd_bwd(loss_fn, *inputs):
    return lambda: torch.autograd.grad(loss_fn(), inputs)


def _logits(rows, vocab, dtype, device):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(rows, vocab, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    return z, y


def _eager_ls_z(z, y):
    return F.cross_entropy(z, y, label_smoothing=SMOOTHING) + Z_LOSS * torch.logsumexp(z.float(), 1).square().mean()


def _ce_case(shape, device) -> Setup:
    rows, vocab, dtype = shape
    z, y = _logits(rows, vocab, dtype, device)

    def ours():
        return regops.cross_entropy(z, y, label_smoothing=SMOOTHING, z_loss=Z_LOSS)

    def torch_ls():
        return F.cross_entropy(z, y, label_smoothing=SMOOTHING)

    def eager():
        return _eager_ls_z(z, y)

    eager_c = compiled(_eager_ls_z)
    variants = {
        "regops": _fwd_bwd(ours, z),
        "torch CE(ls) alone": _fwd_bwd(torch_ls, z),
        "eager": _fwd_bwd(eager, z),  # CE(ls) + z * lse^2
        "compile": _fwd_bwd(lambda: eager_c(z, y), z),
    }
    skipped = _gpu_peers(device, ["liger"])
    if not skipped:
        from liger_kernel.transformers import LigerCrossEntropyLoss  # stubbed when missing: its row says so

        def liger():
            return LigerCrossEntropyLoss(label_smoothing=SMOOTHING, lse_square_scale=Z_LOSS)(z, y)

        variants["liger"] = harness.peer(_fwd_bwd(liger, z), "liger")
    nbytes = 3 * z.numel() * z.element_size()  # read forward, read + write backward
    return Setup(
        variants, bytes=nbytes, forward={"regops": ours, "eager": eager}, note="ls 0.1 + z 1e-4", skipped=skipped
    )


def _regularizers_case(shape, device) -> Setup:
    rows, vocab, dtype = shape
    z, y = _logits(rows, vocab, dtype, device)
    options = {
        "regops plain": {},
        "regops +ls": {"label_smoothing": 0.1},
        "regops +maxsup": {"maxsup": 0.1},
        "regops +z": {"z_loss": 1e-4},
        "regops +confidence": {"confidence_penalty": 0.1},
        "regops +stats": {"return_stats": True},
    }

    def run(kw):
        out = regops.cross_entropy(z, y, **kw)
        return out[0] if isinstance(out, tuple) else out

    variants = {name: _fwd_bwd(lambda kw=kw: run(kw), z) for name, kw in options.items()}
    variants["eager"] = _fwd_bwd(lambda: F.cross_entropy(z, y), z)  # torch's plain CE
    return Setup(variants, bytes=3 * z.numel() * z.element_size(), note="each option alone vs plain fused CE")


def _lce_case(shape, device) -> Setup:
    rows, hidden, vocab, dtype = shape
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, vocab, (rows,), generator=gen).to(device)

    def ours():
        return regops.linear_cross_entropy(h, w, y)

    def eager_fn(h, w):
        return F.cross_entropy(F.linear(h, w).float(), y)

    eager_c = compiled(eager_fn)
    variants = {
        "regops": _fwd_bwd(ours, h, w),
        "eager": _fwd_bwd(lambda: eager_fn(h, w), h, w),  # F.linear + F.cross_entropy
        "compile": _fwd_bwd(lambda: eager_c(h, w), h, w),
    }
    skipped = _gpu_peers(device, ["liger FLCE", "cut cross-entropy"])
    if not skipped:
        from cut_cross_entropy import linear_cross_entropy as cce  # stubbed when missing: their rows say so
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        def liger():
            return LigerFusedLinearCrossEntropyLoss()(w, h, y)

        variants["liger FLCE"] = harness.peer(_fwd_bwd(liger, h, w), "liger")
        variants["cut cross-entropy"] = harness.peer(_fwd_bwd(lambda: cce(h, w, y), h, w), "cut_cross_entropy")
    nbytes = (h.numel() + w.numel()) * h.element_size() * 3  # read h, w forward and backward, write dh, dw
    flops = 6 * rows * hidden * vocab  # forward + two backward matmuls (regops under "mean": the same three)
    return Setup(
        variants, bytes=nbytes, flops=flops, forward={"regops": ours, "eager": lambda: eager_fn(h, w)},
        note="logits never materialised; gradients formed in the forward sweep (mean)", skipped=skipped,
    )  # fmt: skip


def _try_import(name: str):
    """The peer module, or None when it is not installed (its variants are then rows that say so)."""
    try:
        return __import__(name, fromlist=["_"])
    except ModuleNotFoundError:
        return None


def _not_installed(name: str) -> str:
    return f"peer {name!r} is not installed"


timm_mixup = _try_import("timm.data.mixup")
timm_loss = _try_import("timm.loss")


def _mix_label(shape) -> str:
    return "x".join(map(str, shape))


# ------------------------------------------------------------------------------------------------ MixUp / CutMix losses
def _mixed_logits(shape, device):
    gen = torch.Generator().manual_seed(1)
    batch, classes = shape
    z = torch.randn(shape, generator=gen).to(device).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    torch.manual_seed(2)
    _, mix = regops.mix_batch(torch.zeros(batch, 1, 4, 4, device=device), y, mixup_alpha=0.8, cutmix_alpha=1.0)
    return z, y, mix


def _grad_of(loss_fn, z):
    return lambda: torch.autograd.grad(loss_fn(), z)


def _mce_case(shape, device) -> Setup:
    z, y, mix = _mixed_logits(shape, device)
    s = 0.1
    lam = mix.lam

    def ours():
        return regops.mix_cross_entropy(z, mix, label_smoothing=s)

    def eager():
        a = F.cross_entropy(z, mix.target_a, reduction="none", label_smoothing=s)
        b = F.cross_entropy(z, mix.target_b, reduction="none", label_smoothing=s)
        return (lam * a + (1 - lam) * b).mean()

    eager_c = compiled(eager)
    variants = {"regops": _grad_of(ours, z), "eager": _grad_of(eager, z), "compile": _grad_of(eager_c, z)}
    forward = {"regops": ours, "eager": eager}
    skipped = {"timm": _not_installed("timm")} if timm_mixup is None else {}
    if timm_mixup is not None:
        crit = timm_loss.SoftTargetCrossEntropy()

        def timm_fn():
            return crit(z, timm_mixup.mixup_target(y, shape[1], lam.view(-1, 1), s))

        variants["timm"] = _grad_of(timm_fn, z)
        forward["timm"] = timm_fn
    nbytes = 3 * z.numel() * z.element_size()  # read forward, read + write backward
    return Setup(variants, bytes=nbytes, forward=forward, note="fwd+bwd, smoothing 0.1", skipped=skipped)


def _stce_case(shape, device) -> Setup:
    z, y, mix = _mixed_logits(shape, device)
    soft = regops.mixed_targets(mix, shape[1], 0.1)

    def ours():
        return regops.soft_target_cross_entropy(z, soft)

    def eager():
        return torch.sum(-soft * F.log_softmax(z, dim=-1), dim=-1).mean()

    eager_c = compiled(eager)
    variants = {"regops": _grad_of(ours, z), "eager": _grad_of(eager, z), "compile": _grad_of(eager_c, z)}
    skipped = {"timm": _not_installed("timm")} if timm_loss is None else {}
    if timm_loss is not None:
        variants["timm"] = _grad_of(lambda: timm_loss.SoftTargetCrossEntropy()(z, soft), z)
    return Setup(
        variants, bytes=5 * z.numel() * z.element_size(), forward={"regops": ours, "eager": eager}, skipped=skipped
    )


def _bce_case(shape, device) -> Setup:
    z, y, mix = _mixed_logits(shape, device)

    def ours():
        return regops.mix_binary_cross_entropy(z, mix, 0.1, target_threshold=0.2)

    def eager():
        dense = regops.mixed_targets(mix, shape[1], 0.1)
        return F.binary_cross_entropy_with_logits(z, dense.gt(0.2).float())

    eager_c = compiled(eager)
    variants = {"regops": _grad_of(ours, z), "eager": _grad_of(eager, z), "compile": _grad_of(eager_c, z)}
    skipped = {"timm": _not_installed("timm")} if timm_mixup is None else {}
    if timm_mixup is not None:
        crit = timm_loss.BinaryCrossEntropy(target_threshold=0.2)

        def timm_fn():
            return crit(z, timm_mixup.mixup_target(y, shape[1], mix.lam.view(-1, 1), 0.1))

        variants["timm"] = _grad_of(timm_fn, z)
    return Setup(
        variants, bytes=3 * z.numel() * z.element_size(), forward={"regops": ours, "eager": eager}, skipped=skipped
    )


_register("cross_entropy ls+z fwd+bwd", _ce_case, CE_SIZES, _ce_label)
_register("cross_entropy regularizers fwd+bwd", _regularizers_case, CE_SIZES, _ce_label)
_register("linear_cross_entropy fwd+bwd", _lce_case, LCE_SIZES, _lce_label)
_register("mix_cross_entropy fwd+bwd", _mce_case, MIX_LOGITS, _mix_label)
_register("soft_target_cross_entropy fwd+bwd", _stce_case, MIX_LOGITS, _mix_label)
_register("mix_binary_cross_entropy fwd+bwd", _bce_case, MIX_LOGITS, _mix_label)


# ------------------------------------------------------------------------------------------------ the CPU bars
def check_bars(rounds: int = 5, threads: int | None = None) -> dict:
    """``python -m benchmarks.losses [--rounds N] [--threads T]``: the two CPU bars, regops and its baseline
    timed interleaved (a shared machine's load hits both sides alike), median and minimum over ``rounds`` with
    every round kept, and the profiler's CPU allocation peak; appended to
    ``benchmarks/results/<device>/losses-bars.json``."""
    if threads is not None:
        torch.set_num_threads(threads)
    results = _bar_cross_entropy(rounds) + _bar_linear_cross_entropy(rounds)
    env = harness.environment(torch.device("cpu"))
    path = harness.record(
        harness.result_path("losses-bars"), {"environment": env, "rounds": rounds, "results": results}
    )
    print(f"appended to {path}")
    return {"environment": env, "results": results}


def _timed(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, ``rounds`` times, the callables interleaved within each round (after one warm-up)."""
    for fn in fns.values():
        fn()
    return harness.interleaved(fns, rounds)


def _rows(bar: str, times: dict[str, list[float]], peaks_mib: dict[str, float], baseline: str) -> list[dict]:
    import statistics

    rows = []
    for name, seconds in times.items():
        base = times[baseline]
        rows.append({
            "bar": bar, "variant": name, "ms": 1e3 * statistics.median(seconds), "ms_min": 1e3 * min(seconds),
            "rounds": len(seconds), "ms_all": [round(1e3 * t, 3) for t in seconds], "peak_MiB": peaks_mib[name],
            "x_baseline_median": statistics.median(seconds) / statistics.median(base),
            "x_baseline_min": min(seconds) / min(base),
        })  # fmt: skip
    for row in rows:
        print(
            f"{bar}: {row['variant']:>14s} median {row['ms']:9.1f} ms  min {row['ms_min']:9.1f} ms  "
            f"peak {row['peak_MiB']:8.1f} MiB  vs {baseline}: {row['x_baseline_median']:.2f}x (median) "
            f"{row['x_baseline_min']:.2f}x (min)"
        )
    return rows


def _bar_cross_entropy(rounds: int) -> list[dict]:
    """4096 x 32000 fp32, label smoothing 0.1 + z-loss 1e-4, forward + backward, against torch's
    ``F.cross_entropy(label_smoothing=0.1)`` alone and the eager composition with the z-loss. Peak: bytes
    allocated beyond the logits and their gradient."""
    torch.manual_seed(0)
    n, v = 4096, 32000
    z = torch.randn(n, v, requires_grad=True)
    y = torch.randint(0, v, (n,))

    def ours():
        regops.cross_entropy(z, y, label_smoothing=SMOOTHING, z_loss=Z_LOSS).backward()
        z.grad = None

    def torch_ls():
        F.cross_entropy(z, y, label_smoothing=SMOOTHING).backward()
        z.grad = None

    def eager():
        _eager_ls_z(z, y).backward()
        z.grad = None

    fns = {"regops ls+z": ours, "torch CE(ls)": torch_ls, "eager CE(ls)+z": eager}
    grad_bytes = z.numel() * 4  # the gradient every variant must allocate
    peaks = {name: (harness._cpu_peak(fn) - grad_bytes) / 2**20 for name, fn in fns.items()}
    return _rows(f"cross_entropy {n}x{v} fp32 fwd+bwd", _timed(fns, rounds), peaks, "torch CE(ls)")


def _bar_linear_cross_entropy(rounds: int) -> list[dict]:
    """8192 rows, hidden 512, V = 32000 fp32, forward + backward, against ``F.linear`` + ``F.cross_entropy``.
    Peak: every byte allocated during the call (the gradients included)."""
    torch.manual_seed(0)
    n, hdim, v = 8192, 512, 32000
    h = torch.randn(n, hdim, requires_grad=True)
    w = (torch.randn(v, hdim) / hdim**0.5).requires_grad_()
    y = torch.randint(0, v, (n,))

    def lce():
        regops.linear_cross_entropy(h, w, y).backward()
        h.grad = w.grad = None

    def linear_ce():
        F.cross_entropy(F.linear(h, w), y).backward()
        h.grad = w.grad = None

    fns = {"regops": lce, "linear+CE": linear_ce}
    peaks = {name: harness._cpu_peak(fn) / 2**20 for name, fn in fns.items()}
    return _rows(f"linear_cross_entropy {n}x{hdim}->{v} fp32 fwd+bwd", _timed(fns, rounds), peaks, "linear+CE")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the losses' CPU bars (appended to losses-bars.json)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    check_bars(args.rounds, args.threads)
