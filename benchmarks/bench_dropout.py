"""Dropout: regops (mask regenerated in backward) against eager F.dropout and torch.compile(F.dropout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import regops
from benchmarks.harness import Setup, case, compiled

P = 0.1
SIZES = {  # (device type, quick) -> [(numel, dtype)]
    ("cuda", False): [(1 << 26, torch.bfloat16), (1 << 24, torch.float32)],
    ("cuda", True): [(1 << 22, torch.bfloat16)],
    ("cpu", False): [(1 << 22, torch.float32)],
    ("cpu", True): [(1 << 18, torch.float32)],
}


def _input(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(numel, device=device, dtype=dtype, requires_grad=True)


def _fns():
    eager = lambda t: F.dropout(t, P)
    return {"regops": lambda t: regops.dropout(t, P), "eager": eager, "compile": compiled(eager)}


def _register(direction: str) -> None:
    for quick in (False, True):
        for device_type in ("cpu", "cuda"):
            for numel, dtype in SIZES[(device_type, quick)]:
                params = f"n={numel} {str(dtype).removeprefix('torch.')}" + (" quick" if quick else "")

                def make(device, is_quick, numel=numel, dtype=dtype, quick=quick, device_type=device_type):
                    if is_quick != quick or device.type != device_type:
                        return None
                    return _setup(direction, numel, dtype, device)

                case("dropout", f"dropout {direction}", params, devices=(device_type,))(make)


def _setup(direction: str, numel: int, dtype: torch.dtype, device: torch.device) -> Setup:
    x = _input(numel, dtype, device)
    grad = torch.randn_like(x)
    nbytes = numel * x.element_size()
    fns = _fns()
    forward = {name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}
    if direction == "forward":
        variants = {name: _no_grad(fn, x) for name, fn in fns.items()}
        return Setup(variants, bytes=2 * nbytes, forward=forward)
    if direction == "backward":
        variants = {}
        for name, fn in fns.items():
            y = fn(x)
            variants[name] = lambda y=y: torch.autograd.grad(y, x, grad, retain_graph=True)
        return Setup(variants, bytes=2 * nbytes, forward=forward)
    variants = {name: (lambda fn=fn: torch.autograd.grad(fn(x), x, grad)) for name, fn in fns.items()}
    return Setup(variants, bytes=4 * nbytes, forward=forward, note="fwd+bwd")


def _no_grad(fn, x):
    def run():
        with torch.no_grad():
            return fn(x)

    return run


for _direction in ("forward", "backward", "forward+backward"):
    _register(_direction)
