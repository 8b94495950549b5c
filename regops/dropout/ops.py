"""The dropout family's operators: schemas, fakes, backends and derivatives, each declared once.

Every mask is regenerated from the 16-byte seed in backward: autograd saves the seed and the 0-dim ``p``, nothing
of the size of ``x`` (``dropout_bitmask`` saves its packed 1-bit mask on request). References:
:mod:`regops.dropout.reference`; Triton launchers: :mod:`regops.dropout.triton`; C++ and CUDA kernels:
csrc/dropout/.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from regops._core.dtypes import acc_dtype
from regops._core.ops import declare, in_layout_of, like_first
from regops.dropout import reference as ref

TRITON = "regops.dropout.triton:"


def _seeded_mask_autograd(op) -> None:
    """``y = op(x, *params, seed)`` multiplies ``x`` by a mask regenerated from ``seed``: the Jacobian is that
    diagonal mask, so the backward is the same op on the gradient (and every order of derivative works).
    Autograd keeps the seed and ``p`` (0-dim): nothing of x's size."""

    def setup_context(ctx, inputs, output) -> None:
        params = inputs[1:]
        ctx.tensor_slots = [i for i, a in enumerate(params) if isinstance(a, torch.Tensor)]
        ctx.params = [None if isinstance(a, torch.Tensor) else a for a in params]
        ctx.save_for_backward(*(params[i] for i in ctx.tensor_slots))

    def backward(ctx, grad):
        params = list(ctx.params)
        for i, t in zip(ctx.tensor_slots, ctx.saved_tensors, strict=True):
            params[i] = t
        return (op(grad, *params), *([None] * len(params)))

    op.register_autograd(backward, setup_context=setup_context)


# ------------------------------------------------------------------------------------------------ dropout
dropout = declare(
    "dropout(Tensor x, Tensor p, Tensor seed) -> Tensor",
    reference=ref.dropout,
    triton=TRITON + "dropout",
    fake=like_first,
    layout_of_first=True,
)
_seeded_mask_autograd(dropout)


def _bitmask_fake(x, p, seed):
    return like_first(x), x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


dropout_bitmask = declare(
    "dropout_bitmask(Tensor x, Tensor p, Tensor seed) -> (Tensor, Tensor)",
    reference=ref.dropout_bitmask,
    triton=TRITON + "dropout_bitmask",
    fake=_bitmask_fake,
    layout_of_first=True,
)
apply_bitmask = declare(
    "apply_bitmask(Tensor g, Tensor bits, Tensor p) -> Tensor",
    reference=ref.apply_bitmask,
    triton=TRITON + "apply_bitmask",
    fake=like_first,
    layout_of_first=True,
)


def _bitmask_setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], inputs[1])


def _apply_bitmask_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _bitmask_backward(ctx, grad, *_):
    bits, p = ctx.saved_tensors
    return apply_bitmask(grad, bits, p), None, None


dropout_bitmask.register_autograd(_bitmask_backward, setup_context=_bitmask_setup)
apply_bitmask.register_autograd(_bitmask_backward, setup_context=_apply_bitmask_setup)

multi_sample_dropout_mean = declare(
    "multi_sample_dropout_mean(Tensor x, Tensor p, int num_samples, Tensor seed) -> Tensor",
    reference=ref.multi_sample_dropout_mean,
    triton=TRITON + "multi_sample_dropout_mean",
    fake=like_first,
    layout_of_first=True,
)
_seeded_mask_autograd(multi_sample_dropout_mean)

nested_dropout = declare(
    "nested_dropout(Tensor x, Tensor p, int dim, Tensor seed) -> Tensor",
    reference=ref.nested_dropout,
    fake=like_first,
    layout_of_first=True,
    gpu_reference=True,  # no GPU kernel yet: CUDA tensors run the reference (it reads the seed on the host)
)
_seeded_mask_autograd(nested_dropout)


# ------------------------------------------------------------------------------------------------ structured masks
def unit_mask(shape: Sequence[int], p: torch.Tensor, seed: torch.Tensor, device, dtype) -> torch.Tensor:
    """``dropout(ones(shape))``: 0 or ``1/(1-p)`` per element, bit-identical on every backend."""
    return dropout(torch.ones(tuple(shape), dtype=dtype, device=device), p, seed)


def _shared_dropout(x: torch.Tensor, p: torch.Tensor, mask_shape: list[int], seed: torch.Tensor) -> torch.Tensor:
    cd = acc_dtype(x)
    return (x.to(cd) * unit_mask(mask_shape, p, seed, x.device, cd)).to(x.dtype)


shared_dropout = declare(
    "shared_dropout(Tensor x, Tensor p, int[] mask_shape, Tensor seed) -> Tensor",
    reference=_shared_dropout,
    fake=like_first,
    layout_of_first=True,
    composite=True,
)
_seeded_mask_autograd(shared_dropout)

scale_rows_add = declare(
    "scale_rows_add(Tensor x, Tensor scales, Tensor? residual) -> Tensor",
    reference=ref.scale_rows_add,
    triton=TRITON + "scale_rows_add",
    fake=like_first,
    layout_of_first=True,
)


def _drop_path(x, residual, p, scale_by_keep: bool, seed):
    scales = unit_mask((x.shape[0],), p, seed, x.device, acc_dtype(x))
    return scale_rows_add(x, scales if scale_by_keep else (scales != 0).to(scales.dtype), residual)


drop_path = declare(
    "drop_path(Tensor x, Tensor? residual, Tensor p, bool scale_by_keep, Tensor seed) -> Tensor",
    reference=_drop_path,
    fake=like_first,
    layout_of_first=True,
    composite=True,
)


def _drop_path_setup(ctx, inputs, output) -> None:
    _, residual, p, ctx.scale_by_keep, seed = inputs
    ctx.has_residual = residual is not None
    ctx.save_for_backward(p, seed)


def _drop_path_backward(ctx, grad):
    p, seed = ctx.saved_tensors
    dx = drop_path(grad, None, p, ctx.scale_by_keep, seed)
    return dx, (grad if ctx.has_residual else None), None, None, None


drop_path.register_autograd(_drop_path_backward, setup_context=_drop_path_setup)


# ------------------------------------------------------------------------------------------------ bias_dropout_add
bias_dropout_add = declare(
    "bias_dropout_add(Tensor x, Tensor? bias, Tensor residual, Tensor p, Tensor seed) -> Tensor",
    reference=ref.bias_dropout_add,
    triton=TRITON + "bias_dropout_add",
    fake=like_first,
    layout_of_first=True,
)


def _bda_backward_fake(grad, has_bias, p, seed):
    cols = grad.shape[-1] if grad.dim() else 1
    return like_first(grad), grad.new_empty((cols if has_bias else 0,), dtype=acc_dtype(grad))


bias_dropout_add_backward = declare(
    "bias_dropout_add_backward(Tensor grad, bool has_bias, Tensor p, Tensor seed) -> (Tensor, Tensor)",
    reference=ref.bias_dropout_add_backward,
    triton=TRITON + "bias_dropout_add_backward",
    fake=_bda_backward_fake,
    layout_of_first=True,
)


def mask_rows(t: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``t`` times the row-layout dropout mask of (p, seed), differentiably (for double backward)."""
    return bias_dropout_add(t, None, torch.zeros_like(t), p, seed)


def _bda_setup(ctx, inputs, output) -> None:
    _, bias, _, p, seed = inputs
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(p, seed)


def _bda_backward(ctx, grad):
    p, seed = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    if torch.is_grad_enabled():
        # create_graph=True: the gradient from differentiable ops (the mask product is this op again, so
        # derivatives of every order exist); the fused backward below is not differentiable.
        dx = mask_rows(grad, p, seed)
        dbias = ref._rows(dx).to(acc_dtype(dx)).sum(0).to(ctx.bias_dtype) if has_bias else None
        return dx, dbias, grad, None, None
    dx, dbias = bias_dropout_add_backward(grad, has_bias, p, seed)
    return dx, (dbias.to(ctx.bias_dtype) if has_bias else None), grad, None, None


bias_dropout_add.register_autograd(_bda_backward, setup_context=_bda_setup)


# ------------------------------------------------------------------------------------------------ + LayerNorm
def _daln_fake(x, residual, weight, bias, p, eps, rms_norm, residual_in_fp32, seed):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stat = acc_dtype(x)
    s = x.new_empty(x.shape, dtype=ref.prenorm_dtype(x, residual, residual_in_fp32))
    return like_first(x), s, x.new_empty(rows, dtype=stat), x.new_empty(rows, dtype=stat)


dropout_add_layer_norm = declare(
    "dropout_add_layer_norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor p, float eps, "
    "bool rms_norm, bool residual_in_fp32, Tensor seed) -> (Tensor, Tensor, Tensor, Tensor)",
    reference=ref.dropout_add_layer_norm,
    triton=TRITON + "dropout_add_layer_norm",
    fake=_daln_fake,
)


def _daln_backward_fake(dy, ds, s, mean, rstd, weight, has_bias, p, rms_norm, seed, x_dtype, res_dtype):
    acc, cols = acc_dtype(x_dtype), s.shape[-1]
    return (
        s.new_empty(s.shape, dtype=x_dtype),
        s.new_empty(s.shape, dtype=res_dtype) if res_dtype is not None else s.new_empty(0, dtype=acc),
        s.new_empty((cols if weight is not None else 0,), dtype=acc),
        s.new_empty((cols if has_bias else 0,), dtype=acc),
    )


dropout_add_layer_norm_backward = declare(
    "dropout_add_layer_norm_backward(Tensor dy, Tensor? ds, Tensor s, Tensor mean, Tensor rstd, Tensor? weight, "
    "bool has_bias, Tensor p, bool rms_norm, Tensor seed, ScalarType x_dtype, ScalarType? res_dtype) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    reference=ref.dropout_add_layer_norm_backward,
    triton=TRITON + "dropout_add_layer_norm_backward",
    fake=_daln_backward_fake,
)


def _daln_setup(ctx, inputs, output) -> None:
    x, residual, weight, bias, p, eps, rms_norm, _, seed = inputs
    _, s, mean, rstd = output
    ctx.eps, ctx.rms_norm, ctx.x_dtype = eps, rms_norm, x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s, mean, rstd, weight, p, seed)


def _daln_backward_differentiable(ctx, dy, ds, s, weight, p, seed):
    """The backward from differentiable torch ops (create_graph=True): the row statistics are recomputed from
    ``s`` (the saved ``mean``/``rstd`` carry no graph) and the mask product is :func:`mask_rows`; second
    derivatives then flow through ``s`` back into this op's own backward."""
    cd = acc_dtype(ctx.x_dtype)
    shape, cols = s.shape, s.shape[-1]
    sr = s.reshape(-1, cols).to(cd)
    g = dy.reshape(-1, cols).to(cd)
    mean = torch.zeros_like(sr[:, :1]) if ctx.rms_norm else sr.mean(1, keepdim=True)
    rstd = torch.rsqrt(((sr - mean) ** 2).mean(1, keepdim=True) + ctx.eps)
    xhat = (sr - mean) * rstd
    wg = g * weight.to(cd) if weight is not None else g
    dsum = wg - xhat * (xhat * wg).mean(1, keepdim=True)
    if not ctx.rms_norm:
        dsum = dsum - wg.mean(1, keepdim=True)
    dsum = dsum * rstd
    if ds is not None:
        dsum = dsum + ds.reshape(-1, cols).to(cd)
    dx = mask_rows(dsum, p, seed).reshape(shape).to(ctx.x_dtype)
    dres = dsum.reshape(shape).to(ctx.res_dtype) if ctx.res_dtype is not None else None
    dw = (g * xhat).sum(0).to(ctx.weight_dtype) if ctx.weight_dtype is not None else None
    db = g.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, dres, dw, db, None, None, None, None, None


def _daln_backward(ctx, dy, ds, _dmean, _drstd):
    s, mean, rstd, weight, p, seed = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(s.shape, dtype=ctx.x_dtype, device=s.device)
    if torch.is_grad_enabled():  # create_graph=True: double backward
        return _daln_backward_differentiable(ctx, dy, ds, s, weight, p, seed)
    dx, dres, dw, db = dropout_add_layer_norm_backward(
        dy, ds, s, mean, rstd, weight, ctx.bias_dtype is not None, p, ctx.rms_norm, seed, ctx.x_dtype, ctx.res_dtype
    )
    return (
        dx,
        dres if ctx.res_dtype is not None else None,
        dw.to(ctx.weight_dtype) if ctx.weight_dtype is not None else None,
        db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


dropout_add_layer_norm.register_autograd(_daln_backward, setup_context=_daln_setup)


__all__ = [
    "apply_bitmask",
    "bias_dropout_add",
    "bias_dropout_add_backward",
    "drop_path",
    "dropout",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_backward",
    "dropout_bitmask",
    "in_layout_of",
    "mask_rows",
    "multi_sample_dropout_mean",
    "nested_dropout",
    "scale_rows_add",
    "shared_dropout",
    "unit_mask",
]


# ------------------------------------------------------------------------------------------ global_mask_apply
def _global_fake(x, residual, bias, p, scale, mode, num_samples, step, layout, seed, out_dtype=None):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


global_mask_apply = declare(
    "global_mask_apply(Tensor x, Tensor? residual, Tensor? bias, float p, float scale, int mode, int num_samples, "
    "int step, int[] layout, Tensor seed, ScalarType? out_dtype=None) -> Tensor",
    reference=ref.global_mask_apply,
    triton=TRITON + "global_mask_apply",
    fake=_global_fake,
)


def _global_setup_context(ctx, inputs, output) -> None:
    x, residual, bias, p, scale, mode, num_samples, step, layout, seed = inputs[:10]  # out_dtype may be left out
    ctx.params = (p, scale, mode, num_samples, step, layout)
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(seed)


def _global_backward(ctx, grad: torch.Tensor):
    """One shard of a sharded dropout-family op (:mod:`regops.dropout.dtensor`): the Jacobian is the diagonal mask,
    so ``dx`` is the same op on the gradient, ``dresidual = grad``, and the bias gradient sums ``dx``'s columns in
    float32/float64 before rounding, as the single-process ops. Autograd saves the seed: nothing of x's size."""
    (seed,) = ctx.saved_tensors
    x_dtype, res_dtype, bias_dtype = ctx.dtypes
    has_bias = bias_dtype is not None
    dx = global_mask_apply(grad, None, None, *ctx.params, seed, acc_dtype(x_dtype) if has_bias else None)
    dbias = dx.reshape(-1, dx.shape[-1]).sum(0).to(bias_dtype) if has_bias else None
    dres = grad.to(res_dtype) if res_dtype is not None else None
    return dx.to(x_dtype), dres, dbias, None, None, None, None, None, None, None, None


global_mask_apply.register_autograd(_global_backward, setup_context=_global_setup_context)
