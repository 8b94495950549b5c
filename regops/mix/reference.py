"""Reference MixUp/CutMix mixing and mixed targets (CPU path, test oracle, benchmark baseline).

Everything the kernels compute is defined here in plain PyTorch, and the CPU path runs these functions.
They are written to be fast on a CPU as well as clear: work is done in row (or sample) chunks that stay in cache,
with per-sample scalars broadcast, so no function allocates more than one output of the input's size.

The mixing contract (``mix_apply``), for a batch ``x`` of shape ``[B, ..., H, W]`` (the box lives on the last two
dims; a 2-D ``[B, D]`` batch is read as ``[B, 1, 1, D]``) and per-sample ``w_self``, ``w_other`` (float32),
``partner`` (int64, a permutation of ``0..B-1``) and ``box = (y0, y1, x0, x1)`` (int64, half-open, empty allowed)::

    out[b, ..., h, w] = x[partner[b], ..., h, w]                          if (h, w) in box[b]
                      = x[b] * w_self[b] + x[partner[b]] * w_other[b]     otherwise, if w_other[b] != 0
                      = x[b] * w_self[b]                                  otherwise (partner not read)

computed in float32 (float64 for float64 input) and rounded once to x's dtype (uint8: rounded half to even and
clamped to [0, 255]). The two products and the sum are separately rounded float32 operations, which is what
timm's ``x * lam + x_flip * (1 - lam)`` computes for float32 images. The weights are read as float32 values.
The output is contiguous, or channels_last for a channels_last 4-D ``x`` (:func:`memory_format`).
"""

from __future__ import annotations

import torch

from regops._core.dtypes import acc_dtype

# Samples of at least this many elements are mixed one at a time (memory read about once, no batch-sized
# temporaries); smaller ones in chunks of about this many elements, with per-sample weights broadcast.
_CHUNK = 1 << 17


# ------------------------------------------------------------------------------------------------ mixing
def as_nchw(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` ``[B, ..., H, W]`` as ``[B, M, H, W]`` (``[B, D]`` as ``[B, 1, 1, D]``); 4-D tensors as they are."""
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x.reshape(x.shape[0], 1, 1, x.shape[1])
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the mixing op returns for ``x``: channels_last for a channels_last 4-D batch, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _to_output(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return y.round_().clamp_(0, 255).to(dtype)
    return y.to(dtype)


def box_mask(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean ``[n, 1, H, W]``: True inside each sample's half-open box ``(y0, y1, x0, x1)``."""
    dev = box.device
    hh = torch.arange(height, device=dev).view(1, 1, height, 1)
    ww = torch.arange(width, device=dev).view(1, 1, 1, width)
    b = box.view(-1, 4, 1, 1, 1)
    return (hh >= b[:, 0]) & (hh < b[:, 1]) & (ww >= b[:, 2]) & (ww < b[:, 3])


def mix_apply(
    x: torch.Tensor, w_self: torch.Tensor, w_other: torch.Tensor, partner: torch.Tensor, box: torch.Tensor
) -> torch.Tensor:
    """Mix every sample with its partner (see the module docstring); the output keeps x's memory format.

    Large samples are mixed one at a time with two or three whole-sample ops (a multiply into the output, the
    partner's weighted copy added, the box pasted as a slice), so memory is read about once and nothing of the
    batch's size is allocated; small samples are mixed in chunks of the batch.
    """
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    x4, out4 = as_nchw(x), as_nchw(out)
    batch = x4.shape[0]
    per_sample = x4[0].numel()
    ws_all, wo_all = w_self.float().tolist(), w_other.float().tolist()
    partners, boxes = partner.tolist(), box.tolist()
    step = max(1, _CHUNK // per_sample)
    for start in range(0, batch, step):
        rows = slice(start, min(batch, start + step))
        if step == 1:
            _mix_one(x4, out4, start, partners[start], ws_all[start], wo_all[start])
        else:
            _mix_rows(x4, out4, rows, partner[rows], ws_all[rows], wo_all[rows])
        for i in range(rows.start, rows.stop):
            y0, y1, c0, c1 = boxes[i]
            if y1 > y0 and c1 > c0:
                out4[i, :, y0:y1, c0:c1] = x4[partners[i], :, y0:y1, c0:c1]
    return out


def _mix_one(x4: torch.Tensor, out4: torch.Tensor, i: int, j: int, ws: float, wo: float) -> None:
    """``out[i] = x[i] * ws (+ x[j] * wo when wo != 0)`` for one large sample: two or three whole-sample ops."""
    ctype = acc_dtype(x4)
    if x4.dtype == ctype:  # write straight into the output
        if ws == 1.0:
            out4[i].copy_(x4[i])  # x * 1 == x exactly
        else:
            torch.mul(x4[i], ws, out=out4[i])
        if wo != 0.0:
            out4[i].add_(x4[j] * wo)
        return
    y = x4[i].to(ctype) * ws
    if wo != 0.0:
        y.add_(x4[j].to(ctype) * wo)
    out4[i].copy_(_to_output(y, x4.dtype))


def _mix_rows(
    x4: torch.Tensor, out4: torch.Tensor, rows: slice, partner: torch.Tensor, ws: list[float], wo: list[float]
) -> None:
    """``out[rows] = x[rows] * ws (+ x[partner] * wo where wo != 0)``: products and sum each rounded (timm's order)."""
    ctype = acc_dtype(x4)
    shape = (-1, 1, 1, 1)
    ws_t = torch.tensor(ws, dtype=torch.float32, device=x4.device).to(ctype).view(shape)
    direct = x4.dtype == ctype  # float32 / float64: write straight into the output
    y = torch.mul(x4[rows], ws_t, out=out4[rows]) if direct else x4[rows].to(ctype) * ws_t
    if any(w != 0.0 for w in wo):
        wo_t = torch.tensor(wo, dtype=torch.float32, device=x4.device).to(ctype).view(shape)
        xp = x4.index_select(0, partner).to(ctype).mul_(wo_t)
        unused = [k for k, w in enumerate(wo) if w == 0.0]
        if unused:  # those partners are not read at all (a NaN there must not leak in)
            xp.index_fill_(0, torch.tensor(unused, device=x4.device), 0.0)
        y.add_(xp)
    if not direct:
        out4[rows].copy_(_to_output(y, x4.dtype))


def mix_apply_backward(
    grad: torch.Tensor, w_self: torch.Tensor, w_other: torch.Tensor, partner: torch.Tensor, box: torch.Tensor
) -> torch.Tensor:
    """Gradient of :func:`mix_apply` w.r.t. ``x`` (the transpose of the mix)::

    gx[b] += grad[b] * w_self[b]   outside box[b]
    gx[partner[b]] += grad[b] * (1 inside box[b], w_other[b] outside)
    """
    grad = grad.contiguous(memory_format=memory_format(grad))
    g4 = as_nchw(grad)
    _, _, height, width = g4.shape
    ctype = acc_dtype(grad)
    inside = box_mask(box, height, width)
    ws = w_self.float().to(ctype).view(-1, 1, 1, 1)
    wo = w_other.float().to(ctype).view(-1, 1, 1, 1)
    g = g4.to(ctype)
    own = torch.where(inside, 0.0, g * ws)
    other = torch.where(inside, g, torch.where(wo != 0, g * wo, 0.0))
    gx = own.index_add_(0, partner, other)
    out = torch.empty_like(grad)
    as_nchw(out).copy_(gx)
    return out


# ------------------------------------------------------------------------------------------------ targets
def smoothing_values(num_classes: int, smoothing: float) -> tuple[float, float]:
    """timm's (off, on) label values: off = s / C, on = 1 - s + off."""
    off = smoothing / num_classes
    return off, 1.0 - smoothing + off


def mixed_one_hot(
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    w_self: torch.Tensor,
    w_other: torch.Tensor,
    num_classes: int,
    smoothing: float,
) -> torch.Tensor:
    """Dense float32 targets ``y_a * w_self + y_b * w_other`` with smoothed one-hots ``y`` (timm's ``mixup_target``).

    Built as a fill plus two scatters, with every value rounded exactly as timm's dense float32 arithmetic rounds it.
    """
    off, on = smoothing_values(num_classes, smoothing)
    ws, wo = w_self.float(), w_other.float()
    # Python numbers times float32 tensors are float32 products of the numbers rounded to float32, as timm's
    # float32 arithmetic; `where` takes them as float32 too (a float32 tensor beside a Python number).
    on_t = torch.tensor(on, dtype=torch.float32, device=target_a.device)
    either = torch.where(target_a == target_b, on_t, off)
    base = ws * off + wo * off
    at_a = ws * on + either * wo
    at_b = either * ws + wo * on
    out = base.unsqueeze(1).expand(-1, num_classes).contiguous()
    out.scatter_(1, target_b.view(-1, 1), at_b.view(-1, 1))
    out.scatter_(1, target_a.view(-1, 1), at_a.view(-1, 1))
    return out
