"""``regops::global_mask_apply``: one shard of a dropout-family op, its mask addressed by global element index.

Registered like the single-process dropout ops (fake impl, CPU = the reference, Triton kernel, autograd); the
backward is the same op on the gradient (the Jacobian is the diagonal mask), plus ``dresidual = grad`` and the
bias gradient (column sums of ``dx``, computed in float32/float64 before rounding, as the single-process op).
Autograd saves the 16-byte seed and the layout: nothing of the size of ``x``.
"""

from __future__ import annotations

import torch

from regops import _backend
from regops._core.dtypes import acc_dtype
from regops.reference import distributed as _ref

_backend.register(
    "global_mask_apply",
    torch=_ref.global_mask_apply,
    triton="regops.kernels.distributed:global_mask_apply",
)


@torch.library.custom_op("regops::global_mask_apply", mutates_args=())
def global_mask_apply(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    bias: torch.Tensor | None,
    p: float,
    scale: float,
    mode: int,
    num_samples: int,
    step: int,
    layout: list[int],
    seed: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    key, offset = seed.tolist()
    c = lambda t: t.contiguous() if t is not None else None
    return _backend.implementation("global_mask_apply", x.device)(
        x.contiguous(), c(residual), c(bias), p, scale, mode, num_samples, step, list(layout), key, offset, out_dtype
    )


@global_mask_apply.register_fake
def _(x, residual, bias, p, scale, mode, num_samples, step, layout, seed, out_dtype=None):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, residual, bias, p, scale, mode, num_samples, step, layout, seed, _ = inputs
    ctx.params = (p, scale, mode, num_samples, step, layout)
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(seed)


def _backward(ctx, grad: torch.Tensor):
    (seed,) = ctx.saved_tensors
    p, scale, mode, num_samples, step, layout = ctx.params
    has_bias = ctx.bias_dtype is not None
    dx_dtype = acc_dtype(ctx.x_dtype) if has_bias else None  # dbias sums dx before it is rounded
    dx = global_mask_apply(grad, None, None, p, scale, mode, num_samples, step, layout, seed, dx_dtype)
    dbias = dx.reshape(-1, dx.shape[-1]).sum(0).to(ctx.bias_dtype) if has_bias else None
    dres = grad.to(ctx.res_dtype) if ctx.res_dtype is not None else None
    return dx.to(ctx.x_dtype), dres, dbias, None, None, None, None, None, None, None, None


global_mask_apply.register_autograd(_backward, setup_context=_setup_context)
