"""The dropout family's references: pure PyTorch on the shared Philox stream, any device.

Each op's reference takes the op's arguments (contiguous tensors; ``p`` a 0-dim tensor, ``seed`` the int64 ``[2]``
(key, first counter) tensor) and returns its results; the C++, CUDA and Triton kernels match them bit for bit
(reductions: within rounding). The helpers below them work on host numbers and are what the kernels implement.
"""

from __future__ import annotations

import math
import struct

import torch

from regops._core.dtypes import acc_dtype
from regops._core.philox import counter_words, keep_mask, keep_threshold, random_words
from regops._core.validate import probability_value


def host_args(p: torch.Tensor, seed: torch.Tensor) -> tuple[float, int, int]:
    """``(p, key, first counter)`` as host numbers (a device seed is copied to the host)."""
    key, offset = seed.tolist()
    return probability_value(p), key, offset


def dropout_scale(p: float) -> float:
    """The inverted-dropout scale 1/(1-p), rounded to float32 so every backend multiplies by the same number."""
    if p >= 1.0:
        return 0.0
    return struct.unpack("f", struct.pack("f", 1.0 / (1.0 - p)))[0]


def mask_values(keep: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``where(keep, scale, 0)`` in ``dtype``: what every dropout multiplies by.

    Multiplying (never selecting) is torch's semantics: a NaN or Inf at a dropped position gives NaN, as
    ``x * 0`` does, so an overflow stays visible (e.g. to AMP's GradScaler).
    """
    return keep.to(dtype) * scale  # exact: scale is a float32 value, the mask 0 or 1


def dropout(x: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``x * where(keep, scale, 0)`` computed in float32 (float64 for float64) and rounded to x's dtype."""
    p, key, offset = host_args(p, seed)
    keep = keep_mask(key, offset, x.shape, p, device=x.device)
    cd = acc_dtype(x.dtype)
    return (x.to(cd) * mask_values(keep, dropout_scale(p), cd)).to(x.dtype)


# ------------------------------------------------------------------------------------------------ row layout
def row_counters(cols: int) -> int:
    """Philox counters per row in the row layout: each row starts on a fresh counter (``ceil(cols / 4)``)."""
    return (cols + 3) // 4


def row_keep_mask(seed: int, offset: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Keep-mask of shape ``(rows, cols)`` in the *row layout* used by the fused row-wise ops.

    Element ``(r, c)`` takes word ``c % 4`` of counter ``offset + r * ceil(cols / 4) + c // 4``: every row starts
    on a fresh counter, so a kernel can regenerate any row (or tile of rows) without knowing how the rest is
    tiled. When ``cols % 4 == 0`` this is exactly :func:`keep_mask` of the flattened tensor.
    """
    padded = 4 * row_counters(cols)
    return keep_mask(seed, offset, (rows, padded), p, device=device)[:, :cols]


def _rows(t: torch.Tensor) -> torch.Tensor:
    # Explicit row count: reshape(-1, 0) is ambiguous for an empty last dimension.
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1]) if t.dim() > 0 else t.reshape(1, 1)


# ------------------------------------------------------------------------------------------------ bitmask
def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 of ``ceil(n / 8)`` bytes; bit ``j`` of byte ``k`` is element ``8k + j`` (row-major)."""
    flat = keep.reshape(-1)
    n = flat.numel()
    padded = torch.zeros(8 * ((n + 7) // 8), dtype=torch.int32, device=keep.device)
    padded[:n] = flat.to(torch.int32)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=keep.device)
    return (padded.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a flat bool tensor."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n].bool()


def dropout_bitmask(x: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dropout` plus its keep-mask packed 1 bit per element (``ceil(numel / 8)`` uint8 bytes)."""
    p, key, offset = host_args(p, seed)
    keep = keep_mask(key, offset, x.shape, p, device=x.device)
    cd = acc_dtype(x.dtype)
    y = (x.to(cd) * mask_values(keep, dropout_scale(p), cd)).to(x.dtype)
    return y, pack_bits(keep)


def apply_bitmask(g: torch.Tensor, packed: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``g * where(bit, 1/(1-p), 0)`` with the bits of a packed mask (the backward of bitmask dropout)."""
    scale = dropout_scale(probability_value(p))
    keep = unpack_bits(packed, g.numel()).reshape(g.shape)
    cd = acc_dtype(g.dtype)
    return (g.to(cd) * mask_values(keep, scale, cd)).to(g.dtype)


# ------------------------------------------------------------------------------------------------ bias + residual
def bias_dropout_add(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: torch.Tensor, seed: torch.Tensor
) -> torch.Tensor:
    """``residual + dropout(x + bias)`` in float32 (float64 for float64), rounded once to x's dtype.

    ``x`` is read as rows of its last dimension; the mask uses the row layout (:func:`row_keep_mask`).
    """
    p, seed, offset = host_args(p, seed)
    cd = acc_dtype(x.dtype)
    cols = x.shape[-1] if x.dim() else 1
    keep = row_keep_mask(seed, offset, x.numel() // max(cols, 1), cols, p, device=x.device).reshape(x.shape)
    t = x.to(cd)
    if bias is not None:
        t = t + bias.to(cd)
    return (t * mask_values(keep, dropout_scale(p), cd) + residual.to(cd)).to(x.dtype)


def bias_dropout_add_backward(
    grad: torch.Tensor, has_bias: bool, p: torch.Tensor, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for ``x`` (the mask applied to ``grad``) and ``bias`` (float32 column sums of that; an empty
    tensor when ``has_bias`` is false)."""
    p, seed, offset = host_args(p, seed)
    cd = acc_dtype(grad.dtype)
    cols = grad.shape[-1] if grad.dim() else 1
    keep = row_keep_mask(seed, offset, grad.numel() // max(cols, 1), cols, p, device=grad.device)
    dx = grad.to(cd) * mask_values(keep.reshape(grad.shape), dropout_scale(p), cd)
    dbias = _rows(dx).sum(0) if has_bias else dx.new_empty(0)
    return dx.to(grad.dtype), dbias


# ------------------------------------------------------------------------------------------------ + LayerNorm
def prenorm_dtype(x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    """The dtype of the stored pre-norm sum ``s``: float32 with ``residual_in_fp32`` (float64 inputs stay float64),
    else the residual's (x's without a residual)."""
    if residual_in_fp32 and x.dtype != torch.float64:
        return torch.float32
    return residual.dtype if residual is not None else x.dtype


def dropout_add_layer_norm(
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
    """``s = dropout(x) + residual`` (row layout mask), ``y = norm(s) * weight + bias``.

    ``s`` is stored in float32 when ``residual_in_fp32``, else in the residual's dtype (x's when there is no
    residual), and the norm is taken of the stored ``s`` (what an unfused composition normalizes).
    Returns ``(y, s, mean, rstd)``; ``mean`` and ``rstd`` are float32 per row (``mean`` is 0 for RMSNorm).
    """
    p, seed, offset = host_args(p, seed)
    cd = acc_dtype(x.dtype)
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    s_dtype = prenorm_dtype(x, residual, residual_in_fp32)
    t = x.to(cd)
    if p > 0.0:
        keep = row_keep_mask(seed, offset, rows, cols, p, device=x.device).reshape(x.shape)
        t = t * mask_values(keep, dropout_scale(p), cd)
    if residual is not None:
        t = t + residual.to(cd)
    s = t.to(s_dtype, copy=True)  # never an alias of x (p = 0, no residual)
    sr = _rows(s).to(cd)
    if rms_norm:
        mean = torch.zeros(rows, dtype=cd, device=x.device)
        var = (sr * sr).mean(1)
    else:
        mean = sr.mean(1)
        var = ((sr - mean[:, None]) ** 2).mean(1)
    rstd = torch.rsqrt(var + eps)
    y = (sr - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    stat = torch.float64 if cd == torch.float64 else torch.float32
    return y.reshape(x.shape).to(x.dtype), s, mean.to(stat), rstd.to(stat)


def dropout_add_layer_norm_backward(
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
    res_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dresidual, dweight, dbias)``; ``dresidual`` (the gradient of the pre-norm sum) in
    ``res_dtype``, ``dweight``/``dbias`` in float32 (float64); an absent one (no residual, weight or bias) is an
    empty tensor of the accumulation dtype."""
    p, seed, offset = host_args(p, seed)
    cd = acc_dtype(x_dtype)
    cols = s.shape[-1]
    rows = s.numel() // cols if cols else 0
    sr = _rows(s).to(cd)
    g = _rows(dy).to(cd)
    xhat = (sr - mean.to(cd)[:, None]) * rstd.to(cd)[:, None]
    wg = g * weight.to(cd) if weight is not None else g
    c1 = (xhat * wg).mean(1, keepdim=True)
    if rms_norm:
        dsum = (wg - xhat * c1) * rstd.to(cd)[:, None]
    else:
        c2 = wg.mean(1, keepdim=True)
        dsum = (wg - xhat * c1 - c2) * rstd.to(cd)[:, None]
    if ds is not None:
        dsum = dsum + _rows(ds).to(cd)
    dx = dsum
    if p > 0.0:
        keep = row_keep_mask(seed, offset, rows, cols, p, device=s.device)
        dx = dsum * mask_values(keep, dropout_scale(p), cd)
    none = s.new_empty(0, dtype=cd)
    dweight = (g * xhat).sum(0) if weight is not None else none
    dbias = g.sum(0) if has_bias else none
    dres = dsum.reshape(s.shape).to(res_dtype, copy=True) if res_dtype is not None else none
    return dx.reshape(s.shape).to(x_dtype), dres, dweight, dbias


# ------------------------------------------------------------------------------------------------ multi-sample
def multi_sample_counters(numel: int) -> int:
    """Counters per sample: sample ``k`` of a multi-sample call uses first counter ``offset + k * this``."""
    return (numel + 3) // 4


def multi_sample_dropout_mean(x: torch.Tensor, p: torch.Tensor, num_samples: int, seed: torch.Tensor) -> torch.Tensor:
    r"""``x * mean_k(mask_k) / (1-p)``: sample ``k``'s mask is :func:`dropout`'s with offset ``offset + k*ceil(n/4)``.

    The float32 multiplier is ``count * (scale / K)`` with ``scale / K`` rounded to float32 first. Where some
    sample dropped a NaN or Inf, the result is NaN, as the mean of the K products ``x * mask_k`` is in torch.
    """
    p, seed, offset = host_args(p, seed)
    cd = acc_dtype(x.dtype)
    step = multi_sample_counters(x.numel())
    count = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    for k in range(num_samples):
        count += keep_mask(seed, offset + k * step, x.shape, p, device=x.device)
    factor = float_round(dropout_scale(p) / num_samples)
    xc = x.to(cd)
    y = xc * (count.to(cd) * factor)
    z = xc * 0.0  # NaN exactly where x is NaN or Inf
    return torch.where((count < num_samples) & (z != z), z, y).to(x.dtype)


def float_round(v: float) -> float:
    """``v`` rounded to the nearest float32 (kept as a Python float)."""
    return struct.unpack("f", struct.pack("f", v))[0]


# ------------------------------------------------------------------------------------------------ nested dropout
def geometric_thresholds(p: float, units: int) -> list[int]:
    """32-bit thresholds ``T_k = floor((1-p)^k * 2^32)`` for ``k = 1..units-1`` (host floats: same everywhere).

    A sample with word ``w`` keeps ``b = 1 + #{k : w < T_k}`` units, so ``P(b > k) = (1-p)^k``: ``b`` is
    geometric with success probability ``p``, truncated at ``units``.
    """
    out = []
    q = 1.0 - p
    for k in range(1, units):
        t = int(q**k * 2**32)
        if t <= 0:
            break
        out.append(min(t, 2**32 - 1))
    return out


def nested_keep_counts(batch: int, units: int, p: float, seed: int, offset: int, device=None) -> torch.Tensor:
    """Per-sample number of kept leading units (int64, shape ``[batch]``); sample ``b`` uses word ``b``."""
    words = random_words(seed, offset, (batch,), device=device)
    thresholds = torch.tensor(geometric_thresholds(p, units), dtype=torch.int64, device=device)
    if thresholds.numel() == 0:
        return torch.ones(batch, dtype=torch.int64, device=device)
    return 1 + (words[:, None] < thresholds[None, :]).sum(1)


def nested_dropout(x: torch.Tensor, p: torch.Tensor, dim: int, seed: torch.Tensor) -> torch.Tensor:
    """Per sample (dim 0) keep the first ``b`` units along ``dim`` and zero the rest (no rescaling).

    The rest is multiplied by 0 (a NaN or Inf there gives NaN), as every dropout here does.
    """
    p, seed, offset = host_args(p, seed)
    units = x.shape[dim]
    counts = nested_keep_counts(x.shape[0], units, p, seed, offset, device=x.device)
    keep = torch.arange(units, device=x.device)[None, :] < counts[:, None]  # [batch, units]
    shape = [1] * x.dim()
    shape[0], shape[dim] = x.shape[0], units
    return x * keep.reshape(shape).to(x.dtype)


# ------------------------------------------------------------------------------------------------ per-sample scale
def scale_rows_add(x: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``x * scales[b] (+ residual)`` with ``b`` the index along dim 0; float32 (float64) math, one rounding.

    ``scales``: ``[x.shape[0]]`` float32 (float64 for float64 x). Drop path's application step.
    """
    cd = acc_dtype(x.dtype)
    y = x.to(cd) * scales.to(cd).reshape((-1,) + (1,) * (x.dim() - 1))
    if residual is not None:
        y = y + residual.to(cd)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------ global masks
# Seeded masks addressed by *global* element index: the reference for a shard of a larger (sharded) tensor.
#
# A dropout-family mask is a function of (seed, offset, word index) where the word index of an element is an
# affine function of its logical multi-index ``g`` in the *global* tensor::
#
#     word(g) = sum_d g_d * W_d          (W: the op's word strides; see below)
#
# and element ``word`` uses word ``word % 4`` of Philox counter ``offset + word // 4`` (:mod:`regops._core.philox`).
# A shard holding the box ``[o_d, o_d + L_d)`` of the global tensor sees local index ``i = g - o``, so
# ``word = base + sum_d i_d * W_d`` with ``base = sum_d o_d * W_d``. The ``layout`` of a shard is the int list
# ``[base, W_0, ..., W_{ndim-1}]``. Word strides of the single-process ops:
#
# * dropout, multi-sample dropout: the contiguous strides of the global shape (``word = linear index``);
# * masks shared along dims (shared/channel dropout, drop path): the contiguous strides of the mask shape, with
#   ``W_d = 0`` on every shared dim;
# * row layout (bias_dropout_add, dropout_add_layer_norm): ``W_last = 1`` and the contiguous strides of
#   ``global_shape[:-1] + [4 * ceil(H / 4)]`` on the other dims (each row starts on a fresh counter).
#
# So a shard computes exactly the elements of the single-process mask it holds, whatever the sharding.

# How the mask scales the (biased) input ``t``:
MODE_WHERE = 0  # where(keep, t * scale, 0)                  (dropout, bias_dropout_add, dropout_add_layer_norm)
MODE_MUL = 1  # t * where(keep, scale, 0)                     (shared / channel dropout, drop path)
MODE_MULTI = 2  # t * (sum_k keep_k) * scale, k < num_samples  (multi-sample dropout; scale = factor)
MODES = (MODE_WHERE, MODE_MUL, MODE_MULTI)


def word_index(local_shape, layout: list[int], device=None) -> torch.Tensor:
    """int64 tensor of ``local_shape``: the global word index of every local element (``layout`` as above)."""
    base, strides = layout[0], layout[1:]
    if len(strides) != len(local_shape):
        raise ValueError(f"regops: layout has {len(strides)} strides for a {len(local_shape)}-D shard")
    w = torch.full(tuple(local_shape), base, dtype=torch.int64, device=device)
    for d, (size, stride) in enumerate(zip(local_shape, strides, strict=True)):
        view = [1] * len(local_shape)
        view[d] = int(size)
        w = w + (torch.arange(int(size), dtype=torch.int64, device=device) * stride).reshape(view)
    return w


def global_words(seed: int, offset: int, local_shape, layout: list[int], device=None) -> torch.Tensor:
    """The 32-bit word (int64 in ``[0, 2**32)``) per local element: word ``w % 4`` of counter ``offset + w // 4``."""
    local_shape = tuple(int(s) for s in local_shape)
    if local_shape and layout[-1] == 1 and local_shape[-1] > 0:
        return _row_words(seed, offset, local_shape, layout, device)
    w = word_index(local_shape, layout, device)
    words = counter_words(seed, offset + torch.div(w, 4, rounding_mode="floor"))
    return words.gather(-1, (w % 4).unsqueeze(-1)).squeeze(-1)


def _row_words(seed: int, offset: int, local_shape, layout: list[int], device=None) -> torch.Tensor:
    """:func:`global_words` when the last dim has word stride 1: each local row is a run of consecutive words, so
    one Philox evaluation serves four elements (plus at most one per row for an unaligned start)."""
    cols = local_shape[-1]
    starts = word_index((*local_shape[:-1], 1), layout, device).reshape(-1)  # first word of every row
    first = torch.div(starts, 4, rounding_mode="floor")
    span = (cols + 3) // 4 + 1
    counters = offset + first[:, None] + torch.arange(span, dtype=torch.int64, device=device)[None, :]
    words = counter_words(seed, counters).reshape(starts.shape[0], 4 * span)
    index = (starts % 4)[:, None] + torch.arange(cols, dtype=torch.int64, device=device)[None, :]
    return words.gather(1, index).reshape(local_shape)


def global_keep_mask(seed: int, offset: int, local_shape, layout: list[int], p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of the local elements; equals the single-process mask restricted to this shard."""
    return (global_words(seed, offset, local_shape, layout, device) >> 1) > keep_threshold(p)


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
    """One shard of a dropout-family op: ``y = mask(t) (+ residual)`` with ``t = x (+ bias)``.

    Computed in float32 (float64 for float64 ``x``) and rounded once to ``out_dtype`` (default ``x.dtype``).
    ``bias`` is indexed by the local last dim; sample ``k`` of ``MODE_MULTI`` uses counter offset
    ``offset + k * step``. Bit-identical to the single-process reference ops on the elements this shard holds.
    """
    seed, offset = seed.tolist()
    cd = acc_dtype(x.dtype)
    t = x.to(cd)
    if bias is not None:
        t = t + bias.to(cd)
    if mode == MODE_MULTI:
        count = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
        for k in range(num_samples):
            count += global_keep_mask(seed, offset + k * step, x.shape, layout, p, device=x.device)
        y = t * (count.to(cd) * scale)
    else:
        keep = global_keep_mask(seed, offset, x.shape, layout, p, device=x.device)
        if mode == MODE_WHERE:
            y = torch.where(keep, t * scale, 0.0)
        elif mode == MODE_MUL:
            y = t * torch.where(keep, torch.tensor(scale, dtype=cd, device=x.device), 0.0)
        else:
            raise ValueError(f"regops: unknown mask mode {mode}")
    if residual is not None:
        y = y + residual.to(cd)
    return y.to(out_dtype or x.dtype)
