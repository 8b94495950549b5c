"""Triton dropout: one pass, output only; the same kernel applied to the gradient is the backward."""

import torch
import triton
import triton.language as tl

from regops.kernels.philox import keep_mask
from regops.kernels.utils import cast_rne
from regops.reference.dropout import dropout_scale
from regops.reference.philox import keep_threshold


@triton.jit(do_not_specialize=["n", "threshold", "seed", "offset"])
def dropout_kernel(x_ptr, y_ptr, n, threshold, scale, seed, offset, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    in_bounds = idx < n
    keep = keep_mask(seed, offset + start // 4, threshold, BLOCK)
    x = tl.load(x_ptr + idx, mask=in_bounds)
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    y = tl.where(keep, x * scale, 0.0)
    tl.store(y_ptr + idx, cast_rne(y, y_ptr.dtype.element_ty), mask=in_bounds)


def _default_block(x: torch.Tensor) -> int:
    # The interpreter pays per program instance; a GPU wants ~16-32 bytes in flight per thread.
    return 8192 if x.device.type == "cpu" else 2048


def dropout(x: torch.Tensor, p: float, seed: int, offset: int, *, block: int | None = None) -> torch.Tensor:
    """Dropout of a contiguous tensor; bit-identical to regops.reference.dropout.dropout."""
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n == 0:
        return y
    block = block or _default_block(x)
    grid = (triton.cdiv(n, block),)
    dropout_kernel[grid](x, y, n, keep_threshold(p), dropout_scale(p), seed, offset, BLOCK=block, num_warps=4)
    return y


_DTYPES = ("*fp32", "*fp16", "*bf16", "*fp64")
COMPILE_SPECS = [
    (
        dropout_kernel,
        {"x_ptr": t, "y_ptr": t, "n": "i64", "threshold": "i32", "scale": "fp32", "seed": "i64", "offset": "i64"},
        {"BLOCK": 2048},
    )
    for t in _DTYPES
]
