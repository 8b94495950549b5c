"""Triton launchers of the per-example engine's operators, each with its op's signature (float32, float16 and
bfloat16 inputs: the ops declare it, float64 runs the reference). The kernels are in ``regops.kernels.per_example``;
every launch goes through :func:`regops._core.launch.launch`."""

from __future__ import annotations

import torch
import triton

from regops._core.launch import MAX_GRID, launch
from regops.kernels import per_example as K
from regops.per_example.reference import _check


def _launch_per_examples(kernel, tiles: int, batched: tuple[torch.Tensor, ...], *args, **meta) -> None:
    """Grid (tiles, examples): ``batched`` tensors (inputs and the ``[B, tiles]`` partials) are sliced along
    dim 0 into launches of at most 65535 examples (CUDA's limit on grid y); strides are unchanged."""
    b = batched[0].shape[0]
    step = MAX_GRID[1]
    for n0 in range(0, b, step):
        chunk = [t[n0 : n0 + step] for t in batched]
        launch(kernel, (tiles, chunk[0].shape[0]), *chunk, *args, device=batched[0].device, **meta)


def _common(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if len({t.dtype for t in ts}) > 1:  # e.g. fp32 activations with bf16 output gradients under autocast
        return tuple(t.float() for t in ts)
    return ts


def _upcast(g: torch.Tensor) -> bool:
    return g.dtype == torch.bfloat16 and g.device.type == "cpu"  # CPU tensors: the interpreter


def _blocks(device: torch.device) -> tuple[int, int]:
    # The interpreter pays per program instance: few, large programs. A GPU: 64 x 64 tiles, K-chunks of 32.
    return (64, 64) if device.type == "cpu" else (64, 32)


def grad_norms_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Ghost-form ``[B]`` float32 squared norms of ``G_n^T A_n``; ``a`` ``[B, T, d]``, ``g`` ``[B, T, p]``."""
    a, g = _common(a, g)
    b, t, d = a.shape
    p = g.shape[2]
    block_t, block_k = _blocks(a.device)
    n_t = triton.cdiv(t, block_t)
    partial = torch.zeros(b, n_t * n_t, dtype=torch.float32, device=a.device)
    if b == 0 or t == 0:
        return partial.sum(1)
    _launch_per_examples(
        K.gram_kernel,
        n_t * n_t,
        (a, g, partial),
        t,
        d,
        p,
        *a.stride(),
        *g.stride(),
        n_t,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        UPCAST=_upcast(g),
        num_warps=K.GRAM_WARPS,
    )
    return partial.sum(1)


def grad_norms_instantiate(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Instantiate-form ``[B]`` float32 squared norms of ``G_n^T A_n`` (arguments as ``gram_sq_norms``)."""
    a, g = _common(a, g)
    b, t, d = a.shape
    p = g.shape[2]
    block_t, block_dp = (64, 64) if a.device.type == "cpu" else (32, 64)
    n_d, n_p = triton.cdiv(d, block_dp), triton.cdiv(p, block_dp)
    partial = torch.zeros(b, n_d * n_p, dtype=torch.float32, device=a.device)
    if b == 0 or t == 0 or d == 0 or p == 0:
        return partial.sum(1)
    _launch_per_examples(
        K.instantiate_kernel,
        n_d * n_p,
        (a, g, partial),
        t,
        d,
        p,
        *a.stride(),
        *g.stride(),
        n_p,
        n_d * n_p,
        BLOCK_T=block_t,
        BLOCK_D=block_dp,
        BLOCK_P=block_dp,
        UPCAST=_upcast(g),
        num_warps=4,
    )
    return partial.sum(1)


def grad_norms_embedding_gram(ids: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """``[B]`` float32 squared norms of Embedding per-example gradients (ids ``[B, T]``, g ``[B, T, d]``)."""
    b, t = ids.shape
    p = g.shape[2]
    block_t, block_k = _blocks(g.device)
    n_t = triton.cdiv(t, block_t)
    partial = torch.zeros(b, n_t * n_t, dtype=torch.float32, device=g.device)
    if b == 0 or t == 0:
        return partial.sum(1)
    _launch_per_examples(
        K.embedding_gram_kernel,
        n_t * n_t,
        (ids, g, partial),
        t,
        p,
        *ids.stride(),
        *g.stride(),
        padding_idx,
        n_t,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        UPCAST=_upcast(g),
        num_warps=K.GRAM_WARPS,
    )
    return partial.sum(1)


def valuation_cross_gram(a: torch.Tensor, g: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """``[B, B2]`` float32 ``<G_i^T A_i, G2_j^T A2_j>`` (a ``[B, T, d]``, g ``[B, T, p]``, a2/g2 likewise)."""
    _check(a, g, "cross_gram_dots")
    _check(a2, g2, "cross_gram_dots")
    if a.shape[2] != a2.shape[2] or g.shape[2] != g2.shape[2]:
        raise ValueError(f"regops: cross_gram_dots feature sizes differ: {tuple(a.shape)} vs {tuple(a2.shape)}")
    a, g, a2, g2 = _common(a, g, a2, g2)
    b, t, d = a.shape
    b2, t2 = a2.shape[:2]
    p = g.shape[2]
    out = torch.zeros(b, b2, dtype=torch.float32, device=a.device)
    if b == 0 or b2 == 0 or t == 0 or t2 == 0:
        return out
    # The interpreter pays per program instance and per tile: large tiles there. A GPU: 32 x 32, K-chunks of 32.
    block_t, block_k = (64, 64) if a.device.type == "cpu" else (32, 32)
    # One program per pair, folded into grid x; rows are launched in groups that keep x within CUDA's limit.
    rows = max(1, MAX_GRID[0] // b2)
    for r0 in range(0, b, rows):
        nr = min(rows, b - r0)
        launch(
            K.cross_gram_kernel,
            (nr * b2,),
            a,
            g,
            a2,
            g2,
            out,
            r0,
            b2,
            t,
            t2,
            d,
            p,
            *a.stride(),
            *g.stride(),
            *a2.stride(),
            *g2.stride(),
            device=a.device,
            BLOCK_T=block_t,
            BLOCK_K=block_k,
            UPCAST=_upcast(a),
            num_warps=4,
        )
    return out


def valuation_sq_grad_sum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[p, d]`` float32 ``sum_n (G_n^T A_n)^2`` (a ``[B, T, d]``, g ``[B, T, p]``)."""
    _check(a, g, "sq_grad_sum")
    a, g = _common(a, g)
    b, t, d = a.shape
    p = g.shape[2]
    out = torch.zeros(d, p, dtype=torch.float32, device=a.device)
    if b == 0 or t == 0 or d == 0 or p == 0:
        return out.T
    block_t, block_dp = (64, 64) if a.device.type == "cpu" else (32, 64)
    n_d, n_p = triton.cdiv(d, block_dp), triton.cdiv(p, block_dp)
    launch(
        K.sq_sum_kernel,
        (n_d * n_p,),
        a,
        g,
        out,
        b,
        t,
        d,
        p,
        *a.stride(),
        *g.stride(),
        n_p,
        device=a.device,
        BLOCK_T=block_t,
        BLOCK_D=block_dp,
        BLOCK_P=block_dp,
        UPCAST=_upcast(a),
        num_warps=4,
    )
    return out.T
