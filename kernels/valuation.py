"""Triton kernels for data valuation (no autograd; see regops.valuation).

* ``cross_gram_kernel``: the cross Gram form of per-example gradient inner products. Program ``(i, j)`` (folded
  into grid x) walks the ``T x T2`` tile pairs of example ``i`` of the first batch and example ``j`` of the
  second, builds the tiles ``A_i[t] A2_j[s]^T`` and ``G_i[t] G2_j[s]^T`` in registers, one K-chunk at a time,
  and accumulates their elementwise product: it writes only ``<G_i^T A_i, G2_j^T A2_j>``. No ``T x T2`` matrix
  and no ``p x d`` gradient ever reaches memory.
* ``sq_sum_kernel``: the empirical Fisher diagonal of a sequence layer. Program ``(d-tile, p-tile)`` builds
  each example's gradient tile ``A_n[:, d]^T G_n[:, p]`` over T in registers (the instantiate kernel's tiles),
  squares it and adds it to a running sum: it writes only ``sum_n (G_n^T A_n)^2`` (transposed, ``[d, p]``).

Inputs may have any strides; float32 dots run in IEEE precision (no TF32), bf16/fp16 dots accumulate in fp32.
All pointer offsets that multiply an example index by a stride are int64.
"""

import torch
import triton
import triton.language as tl

from regops._core.launch import MAX_GRID, launch
from regops.reference import valuation as _ref


@triton.jit
def _cross_tile(
    x_ptr,
    sxb,
    sxt,
    sxk,
    y_ptr,
    syb,
    syt,
    syk,
    i,
    j,
    t0,
    s0,
    T,
    T2,
    K,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``X_i[t0:t0+BT] Y_j[s0:s0+BT]^T`` accumulated over K in float32 (i, j are int64)."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_s = s0 + tl.arange(0, BLOCK_T)
    xb = x_ptr + i * sxb
    yb = y_ptr + j * syb
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k[None, :] < K
        x = tl.load(xb + offs_t[:, None] * sxt + offs_k[None, :] * sxk, mask=(offs_t[:, None] < T) & kmask, other=0)
        y = tl.load(yb + offs_s[:, None] * syt + offs_k[None, :] * syk, mask=(offs_s[:, None] < T2) & kmask, other=0)
        if UPCAST:  # the interpreter's bf16 dot is wrong: do it in float32 there (same values, exact products)
            x, y = x.to(tl.float32), y.to(tl.float32)
        acc += tl.dot(x, tl.trans(y), input_precision="ieee")
    return acc


@triton.jit
def cross_gram_kernel(
    a_ptr,
    g_ptr,
    a2_ptr,
    g2_ptr,
    out_ptr,
    row0,
    B2,
    T,
    T2,
    D,
    P,
    sab,
    sat,
    sad,
    sgb,
    sgt,
    sgp,
    sa2b,
    sa2t,
    sa2d,
    sg2b,
    sg2t,
    sg2p,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = row0 + pid // B2
    j = pid % B2
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        for s0 in range(0, T2, BLOCK_T):
            ka = _cross_tile(
                a_ptr, sab, sat, sad, a2_ptr, sa2b, sa2t, sa2d, i, j, t0, s0, T, T2, D, BLOCK_T, BLOCK_K, UPCAST
            )
            kg = _cross_tile(
                g_ptr, sgb, sgt, sgp, g2_ptr, sg2b, sg2t, sg2p, i, j, t0, s0, T, T2, P, BLOCK_T, BLOCK_K, UPCAST
            )
            acc += ka * kg
    tl.store(out_ptr + i * B2 + j, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def sq_sum_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    B,
    T,
    D,
    P,
    sab,
    sat,
    sad,
    sgb,
    sgt,
    sgp,
    n_p,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_d = (pid // n_p) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_p = (pid % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    total = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
    for n in range(0, B):
        n64 = tl.cast(n, tl.int64)  # example offsets can pass 2**31
        a_base = a_ptr + n64 * sab
        g_base = g_ptr + n64 * sgb
        acc = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t[:, None] < T
            a = tl.load(
                a_base + offs_t[:, None] * sat + offs_d[None, :] * sad, mask=tmask & (offs_d[None, :] < D), other=0
            )
            g = tl.load(
                g_base + offs_t[:, None] * sgt + offs_p[None, :] * sgp, mask=tmask & (offs_p[None, :] < P), other=0
            )
            if UPCAST:
                a, g = a.to(tl.float32), g.to(tl.float32)
            acc += tl.dot(tl.trans(a), g, input_precision="ieee")
        total += acc * acc
    mask = (offs_d[:, None] < D) & (offs_p[None, :] < P)
    tl.store(out_ptr + offs_d[:, None].to(tl.int64) * P + offs_p[None, :], total, mask=mask)


def _common(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if len({t.dtype for t in ts}) > 1:  # e.g. fp32 activations with bf16 output gradients under autocast
        return tuple(t.float() for t in ts)
    return ts


def _upcast(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu"  # CPU tensors: the interpreter


def cross_gram_dots(a: torch.Tensor, g: torch.Tensor, a2: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """``[B, B2]`` float32 ``<G_i^T A_i, G2_j^T A2_j>`` (a ``[B, T, d]``, g ``[B, T, p]``, a2/g2 likewise)."""
    if torch.float64 in (a.dtype, g.dtype, a2.dtype, g2.dtype):
        return _ref.cross_gram_dots(a, g, a2, g2)
    _ref._check(a, g, "cross_gram_dots")
    _ref._check(a2, g2, "cross_gram_dots")
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
            cross_gram_kernel,
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


def sq_grad_sum(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[p, d]`` float32 ``sum_n (G_n^T A_n)^2`` (a ``[B, T, d]``, g ``[B, T, p]``)."""
    if torch.float64 in (a.dtype, g.dtype):
        return _ref.sq_grad_sum(a, g)
    _ref._check(a, g, "sq_grad_sum")
    a, g = _common(a, g)
    b, t, d = a.shape
    p = g.shape[2]
    out = torch.zeros(d, p, dtype=torch.float32, device=a.device)
    if b == 0 or t == 0 or d == 0 or p == 0:
        return out.T
    block_t, block_dp = (64, 64) if a.device.type == "cpu" else (32, 64)
    n_d, n_p = triton.cdiv(d, block_dp), triton.cdiv(p, block_dp)
    launch(
        sq_sum_kernel,
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


_DTYPES = ("*fp32", "*fp16", "*bf16")


COMPILE_SPECS = [
    *[
        (
            cross_gram_kernel,
            {
                "a_ptr": t,
                "g_ptr": t,
                "a2_ptr": t,
                "g2_ptr": t,
                "out_ptr": "*fp32",
                "row0": "i64",
                "B2": "i64",
                "T": "i32",
                "T2": "i32",
                "D": "i32",
                "P": "i32",
                **{k: "i64" for k in ("sab", "sat", "sad", "sgb", "sgt", "sgp")},
                **{k: "i64" for k in ("sa2b", "sa2t", "sa2d", "sg2b", "sg2t", "sg2p")},
            },
            {"BLOCK_T": 32, "BLOCK_K": 32, "UPCAST": False},
        )
        for t in _DTYPES
    ],
    *[
        (
            sq_sum_kernel,
            {
                "a_ptr": t,
                "g_ptr": t,
                "out_ptr": "*fp32",
                "B": "i32",
                "T": "i32",
                "D": "i32",
                "P": "i32",
                **{k: "i64" for k in ("sab", "sat", "sad", "sgb", "sgt", "sgp")},
                "n_p": "i32",
            },
            {"BLOCK_T": 32, "BLOCK_D": 64, "BLOCK_P": 64, "UPCAST": False},
        )
        for t in _DTYPES
    ],
]
