"""The mix family's Triton launchers: the ops' arguments in, their results out, bit-identical to
:mod:`regops.mix.reference`. The kernel is ``regops.kernels.mix.mix_kernel``; every launch goes through
:func:`regops._core.launch.launch`."""

from __future__ import annotations

import torch
import triton

from regops._core.launch import launch
from regops.kernels.mix import mix_kernel
from regops.mix.reference import memory_format


def _layout(x: torch.Tensor) -> tuple[bool, int, int, int]:
    """(channels_last, inner, height, width) of x viewed as [B, M, H, W] in its memory order."""
    if x.dim() == 2:
        return False, 1, 1, x.shape[1]
    channels_last = memory_format(x) == torch.channels_last
    return channels_last, (x.shape[1] if channels_last else 1), x.shape[-2], x.shape[-1]


def _block(per_sample: int, device: torch.device) -> int:
    cap = 4096 if device.type == "cpu" else 2048
    return min(cap, triton.next_power_of_2(max(per_sample, 16)))


def _launch_mix(x, w_self, w_other, index, box, transpose: bool, block=None) -> torch.Tensor:
    x = x.contiguous(memory_format=memory_format(x))
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    batch = x.shape[0]
    per_sample = x.numel() // batch
    channels_last, inner, height, width = _layout(x)
    block = block or _block(per_sample, x.device)
    n_blocks = triton.cdiv(per_sample, block)
    launch(
        mix_kernel,
        (batch * n_blocks,),
        x,
        y,
        w_self.float().contiguous(),
        w_other.float().contiguous(),
        index.contiguous(),
        box.contiguous(),
        per_sample,
        inner,
        height,
        width,
        n_blocks,
        device=x.device,
        CHANNELS_LAST=channels_last,
        TRANSPOSE=transpose,
        BLOCK=block,
        num_warps=4,
        enable_fp_fusion=False,  # x*w + xp*w' stays three roundings: bit-identical to the reference on a GPU
    )
    return y


def mix_apply(x, w_self, w_other, partner, box, *, block=None) -> torch.Tensor:
    return _launch_mix(x, w_self, w_other, partner, box, False, block)


def mix_apply_backward(grad, w_self, w_other, partner, box, *, block=None) -> torch.Tensor:
    """The transposed mix: each sample's gradient gathers from the sample that took it as a partner (``partner``
    must be a permutation; the kernel reads its inverse)."""
    inverse = torch.empty_like(partner)
    inverse[partner] = torch.arange(partner.numel(), device=partner.device, dtype=partner.dtype)
    return _launch_mix(grad, w_self, w_other, inverse, box, True, block)
