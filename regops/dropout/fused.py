"""Dropout fused with its neighbours: ``residual + dropout(x + bias)`` and ``norm(dropout(x) + residual)``.

Both use the row layout of :func:`regops.reference.dropout.row_keep_mask` (each row of the last dimension starts
on a fresh Philox counter) and regenerate their mask in backward: nothing of the size of ``x`` is saved for the
dropout itself.
"""

from __future__ import annotations

import torch

from regops import _backend, _rng, _validate
from regops.distributed import _hook as _dtensor
from regops.dropout._core import in_layout_of, probability_value, runtime_probability
from regops.reference import dropout as _ref
from regops.reference.philox import keep_threshold

__all__ = ["bias_dropout_add", "dropout_add_layer_norm"]


def _seed_for(device: torch.device, rows: int, cols: int, p: float | None, generator) -> torch.Tensor:
    if p == 0.0:  # None (under torch.compile): p is a runtime value, draw a seed
        return torch.zeros(2, dtype=torch.int64, device=device)  # a device fill: capture-safe
    return _rng.philox_seed(device, rows * 4 * _ref.row_counters(cols), generator)


def _rows_cols(x: torch.Tensor) -> tuple[int, int]:
    cols = x.shape[-1] if x.dim() else 1
    return (x.numel() // cols if cols else 0), cols


# ------------------------------------------------------------------------------------------------ bias_dropout_add
def _bda_cuda(x, bias, residual, p: float, seed: torch.Tensor | int, offset: int | None) -> torch.Tensor:
    seed = _rng.device_seed(seed, offset, x.device)
    return torch.ops.regops_C.bias_dropout_add(x, bias, residual, keep_threshold(p), _ref.dropout_scale(p), seed)


def _bda_cuda_fake(x, bias, residual, threshold, scale, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bda_backward_cuda(grad, has_bias: bool, p: float, seed: torch.Tensor | int, offset: int | None):
    seed = _rng.device_seed(seed, offset, grad.device)
    dx, dbias = torch.ops.regops_C.bias_dropout_add_backward(
        grad, has_bias, keep_threshold(p), _ref.dropout_scale(p), seed
    )
    return dx, (dbias if has_bias else None)


def _bda_backward_cuda_fake(grad, has_bias, threshold, scale, seed):
    cols = grad.shape[-1]
    dbias = grad.new_empty((cols if has_bias else 0,), dtype=_ref.compute_dtype(grad.dtype))
    return torch.empty_like(grad, memory_format=torch.contiguous_format), dbias


_backend.register(
    "bias_dropout_add",
    torch=_ref.bias_dropout_add,
    triton="regops.kernels.dropout_fused:bias_dropout_add",
    cuda=_bda_cuda,
    cuda_fake=_bda_cuda_fake,
)
_backend.register(
    "bias_dropout_add_backward",
    torch=_ref.bias_dropout_add_backward,
    triton="regops.kernels.dropout_fused:bias_dropout_add_backward",
    cuda=_bda_backward_cuda,
    cuda_fake=_bda_backward_cuda_fake,
)


@torch.library.custom_op("regops::bias_dropout_add", mutates_args=())
def _bias_dropout_add_op(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: torch.Tensor, seed: torch.Tensor
) -> torch.Tensor:
    key, offset = _rng.seed_args(seed, "bias_dropout_add", x.device)
    bias = bias.contiguous() if bias is not None else None
    y = _backend.implementation("bias_dropout_add", x.device)(
        x.contiguous(), bias, residual.contiguous(), probability_value(p), key, offset
    )
    return in_layout_of(x, y)


@_bias_dropout_add_op.register_fake
def _(x, bias, residual, p, seed):
    return in_layout_of(x, torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.custom_op("regops::bias_dropout_add_backward", mutates_args=())
def _bias_dropout_add_backward_op(
    grad: torch.Tensor, has_bias: bool, p: torch.Tensor, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    key, offset = _rng.seed_args(seed, "bias_dropout_add_backward", grad.device)
    dx, dbias = _backend.implementation("bias_dropout_add_backward", grad.device)(
        grad.contiguous(), has_bias, probability_value(p), key, offset
    )
    dbias = dbias if dbias is not None else grad.new_empty((0,), dtype=_ref.compute_dtype(grad.dtype))
    return in_layout_of(grad, dx), dbias


@_bias_dropout_add_backward_op.register_fake
def _(grad, has_bias, p, seed):
    cols = grad.shape[-1] if grad.dim() else 1
    dbias = grad.new_empty((cols if has_bias else 0,), dtype=_ref.compute_dtype(grad.dtype))
    return in_layout_of(grad, torch.empty_like(grad, memory_format=torch.contiguous_format)), dbias


def _bda_setup_context(ctx, inputs, output) -> None:
    _, bias, _, p, seed = inputs
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(p, seed)


def _mask_rows(t: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``t`` times the row-layout dropout mask of (p, seed), differentiably (for double backward)."""
    return _bias_dropout_add_op(t, None, torch.zeros_like(t), p, seed)


def _bda_backward(ctx, grad: torch.Tensor):
    p, seed = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    if torch.is_grad_enabled():
        # create_graph=True: build the gradient from differentiable ops (the mask product is this op again,
        # so derivatives of every order exist); the fused backward below is not differentiable.
        dx = _mask_rows(grad, p, seed)
        dbias = _ref._rows(dx).to(_ref.compute_dtype(dx.dtype)).sum(0).to(ctx.bias_dtype) if has_bias else None
        return dx, dbias, grad, None, None
    dx, dbias = _bias_dropout_add_backward_op(grad, has_bias, p, seed)
    return dx, (dbias.to(ctx.bias_dtype) if has_bias else None), grad, None, None


_bias_dropout_add_op.register_autograd(_bda_backward, setup_context=_bda_setup_context)


def bias_dropout_add(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    p: float,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``residual + dropout(x + bias, p)`` in one pass forward and one pass backward.

    .. math:: y = r + \frac{m \odot (x + b)}{1 - p}

    Computed in float32 (float64 for float64) and rounded once. The keep-mask ``m`` is regenerated in backward
    from a 16-byte seed, so autograd saves nothing of the size of ``x``; gradients: ``dx = m * g / (1-p)``,
    ``dbias = sum over rows of dx``, ``dresidual = g``, and derivatives of every order (Hessian estimates work).
    The mask uses the *row layout* (row ``r`` of the last dimension starts at counter ``offset + r * ceil(H/4)``);
    when ``H % 4 == 0`` it is exactly :func:`regops.dropout`'s mask for the same seed. As in torch, the mask
    multiplies: a NaN or Inf of ``x + bias`` at a dropped position gives NaN.

    Args:
        x: ``[..., H]``; float32, float16, bfloat16 or float64.
        bias: ``[H]`` or ``None``.
        residual: x's shape.
        p: drop probability in ``[0, 1]`` (as :func:`regops.dropout`: a runtime value under torch.compile).
        training: ``False`` (or ``p == 0``) is the unfused identity ``residual + (x + bias)``, as torch computes.
        generator: a ``torch.Generator`` on x's device type.

    Dtypes follow torch's type promotion, like the unfused ``residual + dropout(x + bias)``: under autocast a
    bfloat16 ``x`` with float32 ``bias``/``residual`` gives a float32 result (the inputs are cast first).

    Returns:
        Tensor of x's shape and the promoted dtype, in x's memory format when x is dense.

    Example::

        >>> h = regops.bias_dropout_add(attn_out, attn_bias, hidden, p=0.1)
    """
    _validate.floating(x, "x")
    _validate.floating(residual, "residual")
    p_value, p_t = runtime_probability(p)
    _rng.check_generator(generator, x.device)
    if x.dim() == 0:
        raise ValueError("regops: bias_dropout_add needs x with at least one dimension")
    if residual.shape != x.shape:
        raise ValueError(f"regops: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _validate.same_device("x", x, "residual", residual)
    dtype = torch.promote_types(x.dtype, residual.dtype)
    if bias is not None:
        _validate.floating(bias, "bias")
        if bias.shape != x.shape[-1:]:
            raise ValueError(f"regops: bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
        _validate.same_device("x", x, "bias", bias)
        dtype = torch.promote_types(dtype, bias.dtype)
    _validate.flag(training, "training")
    if not training or p_value == 0.0:
        return residual + (x if bias is None else x + bias)
    x, residual = x.to(dtype), residual.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    if _dtensor.is_dtensor(x):
        return _dtensor.forward("dropout", "bias_dropout_add", x, bias, residual, p_value, generator)
    rows, cols = _rows_cols(x)
    return _bias_dropout_add_op(x, bias, residual, p_t, _seed_for(x.device, rows, cols, p_value, generator))


# ------------------------------------------------------------------------------------------------ + LayerNorm
_backend.register(
    "dropout_add_layer_norm",
    torch=_ref.dropout_add_layer_norm,
    triton="regops.kernels.dropout_fused:dropout_add_layer_norm",
)
_backend.register(
    "dropout_add_layer_norm_backward",
    torch=_ref.dropout_add_layer_norm_backward,
    triton="regops.kernels.dropout_fused:dropout_add_layer_norm_backward",
)


def _s_dtype(x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    if residual_in_fp32 and x.dtype != torch.float64:
        return torch.float32
    return residual.dtype if residual is not None else x.dtype


@torch.library.custom_op("regops::dropout_add_layer_norm", mutates_args=())
def _daln_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    p: torch.Tensor,
    eps: float,
    rms_norm: bool,
    residual_in_fp32: bool,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    key, offset = _rng.seed_args(seed, "dropout_add_layer_norm", x.device)
    c = lambda t: t.contiguous() if t is not None else None
    y, s, mean, rstd = _backend.implementation("dropout_add_layer_norm", x.device)(
        x.contiguous(),
        c(residual),
        c(weight),
        c(bias),
        probability_value(p),
        eps,
        rms_norm,
        residual_in_fp32,
        key,
        offset,
    )
    return y, s.contiguous(), mean, rstd


@_daln_op.register_fake
def _(x, residual, weight, bias, p, eps, rms_norm, residual_in_fp32, seed):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(x.shape, dtype=_s_dtype(x, residual, residual_in_fp32)),
        x.new_empty((rows,), dtype=stat),
        x.new_empty((rows,), dtype=stat),
    )


@torch.library.custom_op("regops::dropout_add_layer_norm_backward", mutates_args=())
def _daln_backward_op(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    has_bias: bool,
    p: torch.Tensor,
    rms_norm: bool,
    seed: torch.Tensor,
    x_dtype: torch.dtype,
    res_dtype: torch.dtype,
    has_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    key, offset = _rng.seed_args(seed, "dropout_add_layer_norm_backward", s.device)
    dx, dres, dw, db = _backend.implementation("dropout_add_layer_norm_backward", s.device)(
        dy.contiguous(),
        ds.contiguous() if ds is not None else None,
        s,
        mean,
        rstd,
        weight.contiguous() if weight is not None else None,
        has_bias,
        probability_value(p),
        rms_norm,
        key,
        offset,
        x_dtype,
        res_dtype if has_residual else None,
    )
    acc = _ref.compute_dtype(x_dtype)
    empty = lambda dtype: s.new_empty((0,), dtype=dtype)
    return (
        dx,
        dres if dres is not None else empty(res_dtype),
        dw if dw is not None else empty(acc),
        db if db is not None else empty(acc),
    )


@_daln_backward_op.register_fake
def _(dy, ds, s, mean, rstd, weight, has_bias, p, rms_norm, seed, x_dtype, res_dtype, has_residual):
    acc = _ref.compute_dtype(x_dtype)
    cols = s.shape[-1]
    return (
        s.new_empty(s.shape, dtype=x_dtype),
        s.new_empty(s.shape if has_residual else (0,), dtype=res_dtype),
        s.new_empty((cols if weight is not None else 0,), dtype=acc),
        s.new_empty((cols if has_bias else 0,), dtype=acc),
    )


def _daln_setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, p, eps, rms_norm, _, seed = inputs
    _, s, mean, rstd = output
    ctx.eps, ctx.rms_norm, ctx.x_dtype = eps, rms_norm, x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else x.dtype
    ctx.has_residual = residual is not None
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s, mean, rstd, weight, p, seed)


def _daln_backward_differentiable(ctx, dy, ds, s, weight, p, seed):
    """The backward of :func:`_daln_backward` from differentiable torch ops (create_graph=True).

    The row statistics are recomputed from ``s`` (the saved ``mean``/``rstd`` carry no graph), the mask product
    is :func:`_mask_rows`; second derivatives then flow through ``s`` back into this op's own backward.
    """
    cd = _ref.compute_dtype(ctx.x_dtype)
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
    dx = _mask_rows(dsum, p, seed).reshape(shape).to(ctx.x_dtype)
    dres = dsum.reshape(shape).to(ctx.res_dtype) if ctx.has_residual else None
    dw = (g * xhat).sum(0).to(ctx.weight_dtype) if ctx.weight_dtype is not None else None
    db = g.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, dres, dw, db, None, None, None, None, None


def _daln_backward(ctx, dy, ds, _dmean, _drstd):
    s, mean, rstd, weight, p, seed = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(s.shape, dtype=ctx.x_dtype, device=s.device)
    if torch.is_grad_enabled():  # create_graph=True: double backward
        return _daln_backward_differentiable(ctx, dy, ds, s, weight, p, seed)
    dx, dres, dw, db = _daln_backward_op(
        dy,
        ds,
        s,
        mean,
        rstd,
        weight,
        ctx.bias_dtype is not None,
        p,
        ctx.rms_norm,
        seed,
        ctx.x_dtype,
        ctx.res_dtype,
        ctx.has_residual,
    )
    return (
        dx,
        dres if ctx.has_residual else None,
        dw.to(ctx.weight_dtype) if ctx.weight_dtype is not None else None,
        db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


_daln_op.register_autograd(_daln_backward, setup_context=_daln_setup_context)


def dropout_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    p: float,
    eps: float = 1e-5,
    *,
    rms_norm: bool = False,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""``norm(dropout(x) + residual) * weight + bias`` fused, forward and backward (LayerNorm or RMSNorm).

    .. math::
        s = \frac{m \odot x}{1-p} + r, \qquad
        y = \frac{s - \mu(s)}{\sqrt{\sigma^2(s) + \epsilon}}\, w + b
        \quad(\text{RMSNorm: } y = s / \sqrt{\overline{s^2} + \epsilon}\, w + b)

    The pre-norm sum ``s`` is stored in the residual's dtype (float32 with ``residual_in_fp32``) and the norm is
    taken of that stored value. Saved for backward: ``s``, two floats per row, ``weight`` and the 16-byte seed --
    no mask (it is regenerated, row layout as :func:`bias_dropout_add`). Gradients for x, residual, weight, bias,
    and double backward (``create_graph=True`` switches to a differentiable, unfused backward). The mask
    multiplies, as torch's dropout: a NaN or Inf of ``x`` at a dropped position gives NaN.

    Args:
        x: ``[..., H]``; float32, float16, bfloat16 or float64.
        residual: x's shape (any float dtype), or ``None``.
        weight, bias: ``[H]`` (any float dtype) or ``None``; a bias is allowed with RMSNorm too.
        p: dropout probability of ``x``; eps: added to the variance.
        rms_norm: RMSNorm instead of LayerNorm. prenorm: also return ``s`` (the new residual stream).
        residual_in_fp32: keep ``s`` in float32. training: ``False`` disables the dropout.

    Returns:
        ``y`` (x's dtype), or ``(y, s)`` when ``prenorm``.

    Example::

        >>> y, resid = regops.dropout_add_layer_norm(h, resid, ln.weight, ln.bias, 0.1, prenorm=True)
    """
    _validate.floating(x, "x")
    p_value, p_t = runtime_probability(p)
    _rng.check_generator(generator, x.device)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"regops: dropout_add_layer_norm needs x of shape [..., H] with H > 0, got {tuple(x.shape)}")
    if residual is not None:
        _validate.floating(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"regops: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _validate.same_device("x", x, "residual", residual)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _validate.floating(t, name)
            if t.shape != x.shape[-1:]:
                raise ValueError(f"regops: {name} must have shape ({x.shape[-1]},), got {tuple(t.shape)}")
            _validate.same_device("x", x, name, t)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"regops: eps must be a non-negative number, got {eps!r}")
    _validate.flag(training, "training")
    if not training:
        p_value, p_t = 0.0, torch.zeros((), dtype=torch.float64)
    if _dtensor.is_dtensor(x):
        return _dtensor.forward("dropout", "dropout_add_layer_norm", x, residual, weight, bias, p_value, float(eps),
                                rms_norm, prenorm, residual_in_fp32, generator)  # fmt: skip
    rows, cols = _rows_cols(x)
    seed = _seed_for(x.device, rows, cols, p_value, generator)
    y, s, _, _ = _daln_op(x, residual, weight, bias, p_t, float(eps), rms_norm, residual_in_fp32, seed)
    return (y, s) if prenorm else y
