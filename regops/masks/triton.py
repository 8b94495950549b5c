"""The masks family's Triton launchers: each takes its op's arguments (contiguous tensors, ``p`` and the seed as
tensors) and returns its results. The kernels are in ``regops.kernels.masks``; every launch goes through
:func:`regops._core.launch.launch`. Kernels read the seed from device memory (CUDA-graph safe)."""

from __future__ import annotations

import torch
import triton

from regops._core.dtypes import acc_dtype
from regops._core.launch import launch, sm_count
from regops._core.philox import keep_threshold
from regops._core.validate import probability_value
from regops.dropout.reference import dropout_scale
from regops.kernels import masks as K


def _seed(seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    return seed if seed.device == device or device.type == "meta" else seed.to(device, non_blocking=True)


def _blocks(x: torch.Tensor, R: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_R): large tiles under the interpreter (it pays per program), GPU-sized otherwise."""
    block_r = min(max(triton.next_power_of_2(R), 16), 64)
    if x.device.type == "cpu":
        return 64, 64, block_r
    return 64, 64 if x.element_size() >= 4 else 128, block_r


def _args(x: torch.Tensor, p: torch.Tensor) -> tuple[int, float, int]:
    """(threshold, scale, IEEE): the dot is exact float32 for float32, and for bf16 under the interpreter."""
    pv = probability_value(p)
    ieee = 1 if x.dtype == torch.float32 else 2 if (x.dtype == torch.bfloat16 and x.device.type == "cpu") else 0
    return keep_threshold(pv), dropout_scale(pv), ieee


def lora_dropout(x: torch.Tensor, A: torch.Tensor, p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    K_, R = x.shape[-1], A.shape[0]
    M = x.numel() // K_ if K_ else 0
    y = torch.empty((*x.shape[:-1], R), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if K_ == 0:
        return y.zero_()
    threshold, scale, ieee = _args(x, p)
    bm, bk, br = _blocks(x, R)
    launch(
        K.lora_dropout_fwd_kernel, (triton.cdiv(M, bm), triton.cdiv(R, br)),
        x, A, y, M, K_, R, threshold, scale, _seed(seed, x.device),
        device=x.device, ALIGNED=K_ % 4 == 0, IEEE=ieee, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=4,
    )  # fmt: skip
    return y


def lora_dropout_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    p: torch.Tensor,
    seed: torch.Tensor,
    need_x: bool,
    need_A: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    K_, R = x.shape[-1], A.shape[0]
    M = x.numel() // K_ if K_ else 0
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    dA = A.new_empty(0)
    threshold, scale, ieee = _args(x, p)
    bm, bk, br = _blocks(x, R)
    seed = _seed(seed, x.device)
    if need_x and dx.numel():
        if R == 0:
            dx.zero_()
        else:
            launch(
                K.lora_dropout_dx_kernel, (triton.cdiv(M, bm), triton.cdiv(K_, bk)),
                grad, A, dx, M, K_, R, threshold, scale, seed,
                device=x.device, ALIGNED=K_ % 4 == 0, IEEE=ieee, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=4,
            )  # fmt: skip
    if need_A:
        if M == 0 or A.numel() == 0:
            return dx, torch.zeros_like(A)
        row_blocks = triton.cdiv(M, bm)
        programs = triton.cdiv(K_, bk) * triton.cdiv(R, br)
        target = 4 if x.device.type == "cpu" else 4 * sm_count(x.device)
        splits = max(1, min(row_blocks, target // max(programs, 1)))
        per_split = triton.cdiv(row_blocks, splits)
        splits = triton.cdiv(row_blocks, per_split)
        parts = torch.empty((splits, R, K_), dtype=acc_dtype(x), device=x.device)
        launch(
            K.lora_dropout_da_kernel, (triton.cdiv(K_, bk), triton.cdiv(R, br), splits),
            grad, x, parts, M, K_, R, threshold, scale, seed, per_split,
            device=x.device, ALIGNED=K_ % 4 == 0, IEEE=ieee, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=4,
        )  # fmt: skip
        dA = parts.sum(0).to(A.dtype)
    return dx, dA
