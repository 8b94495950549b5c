"""Merging K deltas into a base: regops.merge (streamed, Philox masks) against PEFT's merge_utils (a stack of K
deltas per tensor, torch.bernoulli masks), time and peak memory per tensor. mergekit is not a dependency; its
per-tensor path is PEFT's (full_like + bernoulli, torch.stack of the deltas)."""

from __future__ import annotations

import torch

import regops
from benchmarks.harness import Setup, case

K = 4
DENSITY = 0.3
SIZES = {  # (device type, quick) -> [numel of the merged tensor]
    ("cuda", False): [1 << 28],
    ("cuda", True): [1 << 22],
    ("cpu", False): [1 << 24],
    ("cpu", True): [1 << 18],
}


def _peft(method):
    try:
        from peft.utils import merge_utils
    except ImportError:
        return None
    w = torch.ones(K)
    return {
        "task_arithmetic": lambda base, ds: base + merge_utils.task_arithmetic(ds, w.to(base)),
        "dare": lambda base, ds: base + merge_utils.dare_linear(ds, w.to(base), DENSITY),
        "ties": lambda base, ds: base + merge_utils.ties(ds, w.to(base), DENSITY),
        "dare_ties": lambda base, ds: base + merge_utils.dare_ties(ds, w.to(base), DENSITY),
    }[method]


def _setup(method: str, numel: int, device) -> Setup:
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(numel, device=device, generator=gen)
    deltas = [torch.randn(numel, device=device, generator=gen) * 1e-2 for _ in range(K)]
    fn = getattr(regops.merge, method)
    args = () if method == "task_arithmetic" else (DENSITY,)
    variants = {"regops": lambda: fn(base, deltas, *args)}
    peft = _peft(method)
    if peft is not None:
        variants["peft"] = lambda: peft(base, deltas)
    return Setup(variants, bytes=(K + 2) * numel * 4, note=f"K={K} density={DENSITY}")


for (_device_type, _quick), _sizes in SIZES.items():
    for _numel in _sizes:
        for _method in ("task_arithmetic", "dare", "ties", "dare_ties"):
            _params = f"n={_numel} float32" + (" quick" if _quick else "")

            def _make(device, is_quick, n=_numel, m=_method, q=_quick, dev=_device_type):
                if is_quick != q or device.type != dev:
                    return None
                return _setup(m, n, device)

            case("merge", _method, _params, devices=(_device_type,))(_make)
