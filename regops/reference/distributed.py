"""Seeded masks addressed by *global* element index: the reference for a shard of a larger (sharded) tensor.

A dropout-family mask is a function of (seed, offset, word index) where the word index of an element is an
affine function of its logical multi-index ``g`` in the *global* tensor::

    word(g) = sum_d g_d * W_d          (W: the op's word strides; see below)

and element ``word`` uses word ``word % 4`` of Philox counter ``offset + word // 4`` (:mod:`regops._core.philox`).
A shard holding the box ``[o_d, o_d + L_d)`` of the global tensor sees local index ``i = g - o``, so
``word = base + sum_d i_d * W_d`` with ``base = sum_d o_d * W_d``. The ``layout`` of a shard is the int list
``[base, W_0, ..., W_{ndim-1}]``. Word strides of the single-process ops:

* dropout, multi-sample dropout: the contiguous strides of the global shape (``word = linear index``);
* masks shared along dims (shared/channel dropout, drop path): the contiguous strides of the mask shape, with
  ``W_d = 0`` on every shared dim;
* row layout (bias_dropout_add, dropout_add_layer_norm): ``W_last = 1`` and the contiguous strides of
  ``global_shape[:-1] + [4 * ceil(H / 4)]`` on the other dims (each row starts on a fresh counter).

So a shard computes exactly the elements of the single-process mask it holds, whatever the sharding.
"""

from __future__ import annotations

import torch

from regops._core.dtypes import acc_dtype
from regops._core.philox import counter_words, keep_threshold

# How the mask scales the (biased) input ``t``:
MODE_WHERE = 0  # where(keep, t * scale, 0)                  (dropout, bias_dropout_add, dropout_add_layer_norm)
MODE_MUL = 1  # t * where(keep, scale, 0)                     (shared / channel dropout, drop path)
MODE_MULTI = 2  # t * (sum_k keep_k) * scale, k < num_samples  (multi-sample dropout; scale = factor)
MODES = (MODE_WHERE, MODE_MUL, MODE_MULTI)


def contiguous_strides(shape) -> list[int]:
    """Row-major strides (in elements) of ``shape``."""
    strides, acc = [], 1
    for s in reversed(list(shape)):
        strides.append(acc)
        acc *= int(s)
    return strides[::-1]


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
    seed: int,
    offset: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One shard of a dropout-family op: ``y = mask(t) (+ residual)`` with ``t = x (+ bias)``.

    Computed in float32 (float64 for float64 ``x``) and rounded once to ``out_dtype`` (default ``x.dtype``).
    ``bias`` is indexed by the local last dim; sample ``k`` of ``MODE_MULTI`` uses counter offset
    ``offset + k * step``. Bit-identical to the single-process reference ops on the elements this shard holds.
    """
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
