"""The losses family's Triton launchers: each takes its op's arguments and returns its results, as the references
(:mod:`regops.losses.reference`, :mod:`regops.losses.reference_mixed`). The kernels are in ``regops.kernels.losses``,
``regops.kernels.losses_mixed`` and ``regops.kernels.symmetric_kl``; every launch goes through
:func:`regops._core.launch.launch`. The linear cross-entropy runs the reference's row blocks with the
cross-entropy kernels on each block (the matmuls are torch's)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import triton

from regops._core.dtypes import acc_dtype
from regops._core.launch import launch
from regops.kernels import losses as K
from regops.kernels import losses_mixed as KM
from regops.kernels import symmetric_kl as KS
from regops.losses import reference as ref
from regops.losses._options import LossOptions


def _block(n_cols: int, device: torch.device) -> int:
    cap = 16384 if device.type == "cpu" else 4096
    return min(cap, triton.next_power_of_2(max(n_cols, 16)))


_VALUES_CACHE: dict = {}


def _device_values(device: torch.device, acc: torch.dtype, values: Sequence[float]) -> torch.Tensor:
    """Scalar options as a device tensor (float64 for float64 logits: float scalars would be float32).

    Cached per (device, dtype, values), so a training loop copies them once and a CUDA-graph capture after a
    warm-up step finds them on the device (no copy inside the capture, no device-to-host sync ever).
    """
    key = (str(device), acc, tuple(values))
    t = _VALUES_CACHE.get(key)
    if t is None:
        if len(_VALUES_CACHE) > 64:
            _VALUES_CACHE.clear()
        t = _VALUES_CACHE[key] = torch.tensor(key[2], dtype=acc).to(device)
    return t


def _options(o: LossOptions, device: torch.device, acc: torch.dtype) -> torch.Tensor:
    """The kernels' ``opt_ptr``: the options in field order, a cap of 1 standing for "no cap" (never divided by 0;
    the ``SOFTCAP`` flag decides)."""
    return _device_values(device, acc, replace(o, softcap=o.softcap or 1.0).values())


# ------------------------------------------------------------------------------------------------ cross-entropy
def cross_entropy(logits, index, tweight, row_weight, class_weight, options, want_stats, *, block=None):
    n, k = logits.shape
    acc = acc_dtype(logits)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    stats = torch.empty((n, ref.N_STATS), dtype=acc, device=logits.device)
    argmax = torch.empty(n, dtype=torch.long, device=logits.device)
    if n == 0:
        return loss, stats, argmax
    o = LossOptions.of(options)
    opts = _options(o, logits.device, acc)
    cw = class_weight if class_weight is not None else opts
    launch(
        K.ce_fwd_kernel, (n,),
        logits, index, tweight.to(acc), row_weight.to(acc), cw, opts, loss, stats, argmax, k, index.shape[1],
        device=logits.device, HAS_CW=class_weight is not None, SOFTCAP=bool(o.softcap), STATS=bool(want_stats),
        DECOUPLED=bool(o.decoupled), BLOCK=block or _block(k, logits.device), num_warps=8,
    )  # fmt: skip
    return loss, stats, argmax


def cross_entropy_backward(
    grad, logits, index, tweight, row_weight, class_weight, stats, argmax, options, *, block=None
):  # fmt: skip
    n, k = logits.shape
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    acc = acc_dtype(logits)
    o = LossOptions.of(options)
    opts = _options(o, logits.device, acc)
    cw = class_weight if class_weight is not None else opts
    launch(
        K.ce_bwd_kernel, (n,),
        grad.to(acc).contiguous(), logits, index, tweight.to(acc), row_weight.to(acc), cw, opts, stats, argmax,
        out, k, index.shape[1],
        device=logits.device, HAS_CW=class_weight is not None, SOFTCAP=bool(o.softcap), DECOUPLED=bool(o.decoupled),
        BLOCK=block or _block(k, logits.device), num_warps=8,
    )  # fmt: skip
    return out


def _linear_chunk(device: torch.device) -> int:
    # On a GPU a block of logits of 2**26 elements (256 MiB in fp32) keeps the matmuls large; on CPU (the
    # interpreter) the reference's size.
    return 1 << 26 if device.type == "cuda" else 0


def linear_cross_entropy(hidden, weight, bias, *args):
    return ref.linear_cross_entropy(hidden, weight, bias, *args, ce=cross_entropy, chunk=_linear_chunk(hidden.device))


def linear_cross_entropy_backward(grad, hidden, weight, bias, *args):
    return ref.linear_cross_entropy_backward(
        grad, hidden, weight, bias, *args, ce_backward=cross_entropy_backward, chunk=_linear_chunk(hidden.device)
    )


def linear_cross_entropy_with_grad(hidden, weight, bias, *args):
    return ref.linear_cross_entropy_with_grad(
        hidden, weight, bias, *args, ce=cross_entropy, ce_backward=cross_entropy_backward,
        chunk=_linear_chunk(hidden.device),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ integer labels
def label_cross_entropy(logits, target, class_weight, ignore_index, options, reduction):
    return ref.labels_forward(cross_entropy, logits, target, class_weight, ignore_index, options, reduction)


def label_cross_entropy_backward(grad, logits, target, class_weight, stats, argmax, ignore_index, options, reduction):
    return ref.labels_backward(
        cross_entropy_backward, grad, logits, target, class_weight, stats, argmax, ignore_index, options, reduction
    )


# ------------------------------------------------------------------------------------------------ symmetric KL
def _skl_block(t: torch.Tensor, cols: int) -> int:
    cap = 16384 if t.device.type == "cpu" else 4096
    return min(max(triton.next_power_of_2(cols), 16), cap)


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = a.shape
    acc = acc_dtype(a)
    loss = torch.empty(rows, dtype=acc, device=a.device)
    stats = torch.empty((rows, 4), dtype=acc, device=a.device)
    if rows == 0:
        return loss, stats
    launch(
        KS.symmetric_kl_fwd_kernel, (rows,), a, b, loss, stats, cols,
        device=a.device, BLOCK=_skl_block(a, cols), num_warps=8,
    )  # fmt: skip
    return loss, stats


def symmetric_kl_backward(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = a.shape
    ga = torch.empty_like(a, memory_format=torch.contiguous_format)
    gb = torch.empty_like(b, memory_format=torch.contiguous_format)
    if rows == 0 or cols == 0:
        return ga.zero_(), gb.zero_()
    launch(
        KS.symmetric_kl_bwd_kernel, (rows,), grad.contiguous(), a, b, stats, ga, gb, cols,
        device=a.device, BLOCK=_skl_block(a, cols), num_warps=8,
    )  # fmt: skip
    return ga, gb


# ------------------------------------------------------------------------------------------------ mixed / soft targets
def _loss_block(n_cols: int, device: torch.device) -> int:
    cap = 8192 if device.type == "cpu" else 4096
    return min(cap, triton.next_power_of_2(max(n_cols, 16)))


def mix_cross_entropy(logits, target_a, target_b, lam, smoothing, *, block=None):
    n, c = logits.shape
    acc = acc_dtype(logits)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    block = block or _loss_block(c, logits.device)
    opts = _device_values(logits.device, acc, (smoothing,))
    launch(
        KM.mix_ce_forward_kernel, (n,), logits, target_a, target_b, lam.to(acc).contiguous(), loss, lse, c, opts,
        device=logits.device, BLOCK=block,
    )  # fmt: skip
    return loss, lse


def mix_cross_entropy_backward(grad, logits, lse, target_a, target_b, lam, smoothing, *, block=None):
    n, c = logits.shape
    acc = acc_dtype(logits)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    block = block or _loss_block(c, logits.device)
    opts = _device_values(logits.device, acc, (smoothing,))
    launch(
        KM.mix_ce_backward_kernel, (n, triton.cdiv(c, block)),
        grad.to(acc).contiguous(), logits, lse, target_a, target_b, lam.to(acc).contiguous(), out, c, opts,
        device=logits.device, BLOCK=block,
    )  # fmt: skip
    return out


def soft_target_cross_entropy(logits, target, *, block=None):
    n, c = logits.shape
    loss = torch.empty(n, dtype=acc_dtype(logits), device=logits.device)
    stats = torch.empty(n, 2, dtype=acc_dtype(logits), device=logits.device)
    block = block or _loss_block(c, logits.device)
    launch(KM.soft_ce_forward_kernel, (n,), logits, target, loss, stats, c, device=logits.device, BLOCK=block)
    return loss, stats


def soft_target_cross_entropy_backward(grad, logits, stats, target, *, block=None):
    n, c = logits.shape
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    block = block or _loss_block(c, logits.device)
    launch(
        KM.soft_ce_backward_kernel, (n, triton.cdiv(c, block)),
        grad.to(acc_dtype(logits)).contiguous(), logits, stats, target, out, c, device=logits.device, BLOCK=block,
    )  # fmt: skip
    return out


def _bce_args(logits, lam, smoothing, threshold, weight, pos_weight):
    """(lam, weight, pos_weight, options) as the kernels read them, and their flags: float32 lambdas (timm's
    float32 targets) unless the logits are float64, then float64 targets."""
    acc = acc_dtype(logits)
    dummy = logits.new_empty(1, dtype=acc)
    opts = _device_values(logits.device, acc, (smoothing, float(threshold) if threshold is not None else 0.0))
    args = (
        lam.to(acc).contiguous(),
        weight.to(acc).contiguous() if weight is not None else dummy,
        pos_weight.to(acc).contiguous() if pos_weight is not None else dummy,
    )
    flags = {
        "HAS_THRESHOLD": threshold is not None,
        "HAS_WEIGHT": weight is not None,
        "HAS_POS_WEIGHT": pos_weight is not None,
    }
    return args, opts, flags


def mix_binary_cross_entropy(logits, target_a, target_b, lam, smoothing, threshold, weight, pos_weight, *, block=None):
    n, c = logits.shape
    loss = torch.empty(n, dtype=acc_dtype(logits), device=logits.device)
    (lam, w, pw), opts, flags = _bce_args(logits, lam, smoothing, threshold, weight, pos_weight)
    launch(
        KM.mix_bce_forward_kernel, (n,), logits, target_a, target_b, lam, w, pw, loss, c, opts,
        device=logits.device, BLOCK=block or _loss_block(c, logits.device), **flags,
    )  # fmt: skip
    return loss


def mix_binary_cross_entropy_backward(
    grad, logits, target_a, target_b, lam, smoothing, threshold, weight, pos_weight, *, block=None
):
    n, c = logits.shape
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    (lam, w, pw), opts, flags = _bce_args(logits, lam, smoothing, threshold, weight, pos_weight)
    block = block or _loss_block(c, logits.device)
    launch(
        KM.mix_bce_backward_kernel, (n, triton.cdiv(c, block)),
        grad.to(acc_dtype(logits)).contiguous(), logits, target_a, target_b, lam, w, pw, out, c, opts,
        device=logits.device, BLOCK=block, **flags,
    )  # fmt: skip
    return out
