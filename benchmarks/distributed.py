"""Dropout on one shard of a DTensor: regops' shard op (mask by global element index) against regops.dropout of
the same local tensor (a layout-dependent mask), eager F.dropout and torch.compile(F.dropout). Single process:
what each rank pays for a layout-independent mask. The shard here (half the columns, rows of a multiple of 4
words) takes the kernel's aligned path: one Philox evaluation per four elements, as regops.dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import regops
from benchmarks.harness import Setup, case, compiled
from regops.dropout.ops import global_mask_apply
from regops.dropout.reference import MODE_WHERE, dropout_scale

P = 0.1
SHAPES = {  # (device type, quick) -> [(global rows, global cols, dtype)]; the shard holds half of the columns
    ("cuda", False): [(8192, 8192, torch.bfloat16)],
    ("cuda", True): [(2048, 2048, torch.bfloat16)],
    ("cpu", False): [(2048, 2048, torch.float32)],
    ("cpu", True): [(512, 512, torch.float32)],
}


def _setup(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Setup:
    local = torch.randn(rows, cols // 2, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(local)
    # Shard(1) of a [rows, cols] tensor on the second of two ranks: word = r * cols + (cols / 2 + c)
    layout = [cols // 2, cols, 1]
    seed = torch.tensor([1234, 0])

    def shard(t):
        return global_mask_apply(t, None, None, P, dropout_scale(P), MODE_WHERE, 1, 0, layout, seed)

    eager = lambda t: F.dropout(t, P)  # noqa: E731
    fns = {"regops": shard, "dropout": lambda t: regops.dropout(t, P), "eager": eager, "compile": compiled(eager)}
    variants = {name: (lambda fn=fn: torch.autograd.grad(fn(local), local, grad)) for name, fn in fns.items()}
    forward = {name: (lambda fn=fn: fn(local)) for name, fn in fns.items()}
    nbytes = local.numel() * local.element_size()
    return Setup(variants, bytes=4 * nbytes, forward=forward, note="fwd+bwd")


for _quick in (False, True):
    for _device_type in ("cpu", "cuda"):
        for _rows, _cols, _dtype in SHAPES[(_device_type, _quick)]:
            _params = f"{_rows}x{_cols // 2} of {_rows}x{_cols} {str(_dtype).removeprefix('torch.')}" + (
                " quick" if _quick else ""
            )

            def _make(device, is_quick, rows=_rows, cols=_cols, dtype=_dtype, quick=_quick, dt=_device_type):
                if is_quick != quick or device.type != dt:
                    return None
                return _setup(rows, cols, dtype, device)

            case("distributed", "dropout of a Shard(1) shard", _params, devices=(_device_type,))(_make)
