"""The penalties family's Triton launchers: each takes its op's arguments and returns its results. The kernels are
in ``regops.kernels.penalties``; every launch goes through :func:`regops._core.launch.launch`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from regops._core.dtypes import acc_dtype
from regops._core.launch import launch, sm_count
from regops.kernels import penalties as K
from regops.penalties.reference import EPS

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _scalar(v: float, device: torch.device) -> torch.Tensor:
    """A float64 value kernels load (never a launch argument: Triton would round a float one to float32)."""
    return torch.tensor([v], dtype=torch.float64).to(device, non_blocking=True)


def relu_l1(x: torch.Tensor, l1: torch.Tensor, threshold: float, squared: bool, stats: bool):
    cd = acc_dtype(x)
    d = x.shape[-1]
    M = x.numel() // d if d else 0
    y = torch.empty_like(x)
    cpu = x.device.type == "cpu"
    block_c = min(max(triton.next_power_of_2(max(d, 1)), 16), 1024 if cpu else 256)
    block_r = max(1, min(64, (16384 if cpu else 2048) // block_c))
    row_blocks = triton.cdiv(M, block_r)
    programs = max(1, min(row_blocks, 4 if cpu else 4 * sm_count(x.device)))
    rows_per_program = triton.cdiv(row_blocks, programs) * block_r
    programs = triton.cdiv(M, rows_per_program) if M else 0
    token = x.new_empty(x.shape[:-1] if stats else (0,), dtype=cd)
    counts = torch.zeros((programs, d) if stats else (0,), dtype=torch.int32, device=x.device)
    sums = x.new_empty((M,) if stats else (0,), dtype=cd)
    if programs:
        launch(
            K.relu_l1_fwd_kernel, (programs,), x, y, token if stats else y, counts if stats else y,
            sums if stats else y, _scalar(threshold, x.device), M, d, rows_per_program,
            device=x.device, SQUARED=squared, STATS=stats, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    if not stats:
        e = x.new_empty(0, dtype=cd)
        return y, e, e.clone(), e.clone()
    unit = counts.sum(0).to(cd) / M if M else torch.full((d,), float("nan"), dtype=cd, device=x.device)
    return y, token, unit, sums.sum()


def relu_l1_backward(grad: torch.Tensor, x: torch.Tensor, l1: torch.Tensor, threshold: float, squared: bool):
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        block = 8192 if x.device.type == "cpu" else 1024
        launch(
            K.relu_l1_bwd_kernel, (triton.cdiv(n, block),), grad.to(x.dtype), x, dx,
            l1.to(x.device, torch.float64).reshape(1), _scalar(threshold, x.device), n,
            device=x.device, SQUARED=squared, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return dx


def power_iteration(weights: list[torch.Tensor], v: torch.Tensor, num_iters: int):
    G = len(weights)
    m, n = weights[0].shape
    dev = v.device
    if any(w.dtype != weights[0].dtype or w.shape != (m, n) for w in weights):
        raise ValueError("regops: power_iteration takes a group of matrices of one shape and dtype")
    cpu = dev.type == "cpu"
    block_r, block_c = (16, 1024) if cpu else (16, 128)
    row_blocks = triton.cdiv(m, block_r)
    splits = 1 if cpu else max(1, min(row_blocks, (2 * sm_count(dev)) // max(G, 1)))
    rows_per_split = triton.cdiv(row_blocks, splits) * block_r
    splits = triton.cdiv(m, rows_per_split)
    table = torch.tensor([w.data_ptr() for w in weights], dtype=torch.int64).to(dev, non_blocking=True)
    vin = v.to(torch.float32).reshape(G, 1, n).contiguous()
    vhat = torch.empty((G, splits, n), dtype=torch.float32, device=dev)
    uraw = torch.empty((G, m), dtype=torch.float32, device=dev)
    usq = torch.empty((G, splits), dtype=torch.float32, device=dev)
    z = vin
    for _ in range(num_iters):
        z_next = torch.empty((G, splits, n), dtype=torch.float32, device=dev)
        launch(
            K.power_iteration_kernel, (G, splits), table, z, vhat, uraw, z_next, usq, m, n, z.shape[1], splits,
            rows_per_split, device=dev, DTYPE=_TL[weights[0].dtype], BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
        z = z_next
    zsum = z.sum(1)
    znorm = zsum.norm(dim=1)
    unorm = usq.sum(1).sqrt().clamp_min(EPS)
    return znorm / unorm, uraw / unorm[:, None], zsum / znorm.clamp_min(EPS)[:, None]


def orthogonality_penalty(w: torch.Tensor) -> torch.Tensor:
    lead = w.shape[:-2]
    m, n = w.shape[-2:]
    wb = w.reshape(-1, m, n)
    B = wb.shape[0]
    rows = m <= n
    k, c = (m, n) if rows else (n, m)
    stride_r, stride_c = (wb.stride(1), wb.stride(2)) if rows else (wb.stride(2), wb.stride(1))
    block = 64 if w.device.type == "cpu" else 64
    tiles = triton.cdiv(k, block)
    parts = torch.empty((B, tiles, tiles), dtype=torch.float32, device=w.device)
    if B and k:
        ieee = 1 if w.dtype == torch.float32 else 2 if (w.dtype == torch.bfloat16 and w.device.type == "cpu") else 0
        launch(
            K.gram_penalty_kernel, (tiles, tiles, B), wb, parts, k, c, wb.stride(0), stride_r, stride_c, tiles,
            device=w.device, IEEE=ieee, BLOCK=block, BLOCK_C=32 if w.device.type != "cpu" else 128, num_warps=4,
        )  # fmt: skip
    return parts.sum((1, 2)).reshape(lead).to(acc_dtype(w))
