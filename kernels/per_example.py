"""Triton kernels of the per-example engine (no autograd; launchers in :mod:`regops.per_example.triton`).

* ``gram_kernel``: ghost form. Program (n, ti, tj) with tj >= ti builds the T-tiles (A_i A_j^T) and
  (G_i G_j^T) in registers, one K-chunk at a time, and writes only ``sum((A_i A_j^T) * (G_i G_j^T))``
  (twice for the off-diagonal tiles): no T x T matrix ever reaches memory.
* ``instantiate_kernel``: program (n, d-tile, p-tile) accumulates ``A_n[:, d]^T G_n[:, p]`` over T and writes
  only the sum of its squares: the B x p x d per-example gradients are never written.
* ``embedding_gram_kernel``: the Gram form of an Embedding; the activation Gram is ``[id_t = id_t' != pad]``.
* ``cross_gram_kernel``: the cross Gram form of per-example gradient inner products between two batches. Program
  ``(i, j)`` (folded into grid x) walks the ``T x T2`` tile pairs of example ``i`` of the first batch and example
  ``j`` of the second, builds the tiles ``A_i[t] A2_j[s]^T`` and ``G_i[t] G2_j[s]^T`` in registers and
  accumulates their elementwise product: it writes only ``<G_i^T A_i, G2_j^T A2_j>``.
* ``sq_sum_kernel``: the empirical Fisher diagonal of a sequence layer. Program ``(d-tile, p-tile)`` builds each
  example's gradient tile ``A_n[:, d]^T G_n[:, p]`` over T in registers, squares it and adds it to a running sum:
  it writes only ``sum_n (G_n^T A_n)^2`` (transposed, ``[d, p]``).

The per-example norm kernels write one float32 partial per program; the launcher sums the partials per example
(deterministic). Inputs may have any strides; float32 dots run in IEEE precision (no TF32), bf16/fp16 dots
accumulate in fp32 (the interpreter's bf16 dot is wrong: ``UPCAST`` does it in float32 there).

Grids: the tiles of one example run along x (up to 2**31 - 1 programs: T = 65536 gives 1024**2 Gram tiles,
a 16384 x 16384 Linear 65536 instantiate tiles), the examples along y, in launches of at most 65535 examples.
Offsets are int64: ``t * stride`` passes 2**31 for long sequences of wide layers.
"""

import triton
import triton.language as tl


@triton.jit
def _gram_tile(x_ptr, sb, st, sk, n, ti, tj, T, K, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """(X_i X_j^T) for T-tiles i, j of example n of X [B, T, K], accumulated over K in float32."""
    offs_i = ti.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tj.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    base = x_ptr + n.to(tl.int64) * sb
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = offs_k[None, :] < K
        xi = tl.load(base + offs_i[:, None] * st + offs_k[None, :] * sk, mask=(offs_i[:, None] < T) & kmask, other=0)
        xj = tl.load(base + offs_j[:, None] * st + offs_k[None, :] * sk, mask=(offs_j[:, None] < T) & kmask, other=0)
        if UPCAST:  # the interpreter's bf16 dot is wrong: do it in float32 there (same values, exact products)
            xi, xj = xi.to(tl.float32), xj.to(tl.float32)
        acc += tl.dot(xi, tl.trans(xj), input_precision="ieee")
    return acc


@triton.jit
def gram_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    T,
    D,
    P,
    sab,
    sat,
    sad,
    sgb,
    sgt,
    sgp,
    n_t,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    ti = pid // n_t
    tj = pid % n_t
    if tj >= ti:
        sa = _gram_tile(a_ptr, sab, sat, sad, n, ti, tj, T, D, BLOCK_T, BLOCK_K, UPCAST)
        sg = _gram_tile(g_ptr, sgb, sgt, sgp, n, ti, tj, T, P, BLOCK_T, BLOCK_K, UPCAST)
        part = tl.sum(tl.sum(sa * sg, axis=1), axis=0)
        weight = tl.where(tj > ti, 2.0, 1.0)
        tl.store(out_ptr + n.to(tl.int64) * n_t * n_t + pid, part * weight)


@triton.jit
def instantiate_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
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
    n_tiles,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    offs_d = (pid // n_p).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_p = (pid % n_p).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    a_base = a_ptr + n.to(tl.int64) * sab
    g_base = g_ptr + n.to(tl.int64) * sgb
    acc = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        tmask = offs_t[:, None] < T
        a = tl.load(
            a_base + offs_t[:, None] * sat + offs_d[None, :] * sad,
            mask=tmask & (offs_d[None, :] < D),
            other=0,
        )
        g = tl.load(
            g_base + offs_t[:, None] * sgt + offs_p[None, :] * sgp,
            mask=tmask & (offs_p[None, :] < P),
            other=0,
        )
        if UPCAST:
            a, g = a.to(tl.float32), g.to(tl.float32)
        acc += tl.dot(tl.trans(a), g, input_precision="ieee")
    part = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    tl.store(out_ptr + n.to(tl.int64) * n_tiles + pid, part)


@triton.jit
def embedding_gram_kernel(
    ids_ptr,
    g_ptr,
    out_ptr,
    T,
    P,
    sib,
    sit,
    sgb,
    sgt,
    sgp,
    padding_idx,
    n_t,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    ti = pid // n_t
    tj = pid % n_t
    if tj >= ti:
        offs_i = ti.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_j = tj.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        base = ids_ptr + n.to(tl.int64) * sib
        id_i = tl.load(base + offs_i * sit, mask=offs_i < T, other=-1)
        id_j = tl.load(base + offs_j * sit, mask=offs_j < T, other=-2)
        same = (id_i[:, None] == id_j[None, :]) & (id_i[:, None] != padding_idx)
        sg = _gram_tile(g_ptr, sgb, sgt, sgp, n, ti, tj, T, P, BLOCK_T, BLOCK_K, UPCAST)
        part = tl.sum(tl.sum(tl.where(same, sg, 0.0), axis=1), axis=0)
        weight = tl.where(tj > ti, 2.0, 1.0)
        tl.store(out_ptr + n.to(tl.int64) * n_t * n_t + pid, part * weight)


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


# Two 64 x 64 float32 Gram tiles per program: on 4 warps the fp32 kernel spilled 88-184 B per thread (sm_90/sm_80);
# on 8 warps it takes ~130-170 registers and no spill (tests/test_kernels_compile.py reports it).
GRAM_WARPS = 8

_DTYPES = ("*fp32", "*fp16", "*bf16")
_STRIDES = {k: "i64" for k in ("sab", "sat", "sad", "sgb", "sgt", "sgp")}
COMPILE_SPECS = [
    *[
        (
            gram_kernel,
            {
                "a_ptr": t,
                "g_ptr": t,
                "out_ptr": "*fp32",
                "T": "i32",
                "D": "i32",
                "P": "i32",
                **_STRIDES,
                "n_t": "i32",
            },
            {"BLOCK_T": 64, "BLOCK_K": 32, "UPCAST": False},
            {"num_warps": GRAM_WARPS},
        )
        for t in _DTYPES
    ],
    *[
        (
            instantiate_kernel,
            {
                "a_ptr": t,
                "g_ptr": t,
                "out_ptr": "*fp32",
                "T": "i32",
                "D": "i32",
                "P": "i32",
                **_STRIDES,
                "n_p": "i32",
                "n_tiles": "i32",
            },
            {"BLOCK_T": 32, "BLOCK_D": 64, "BLOCK_P": 64, "UPCAST": False},
        )
        for t in _DTYPES
    ],
    *[
        (
            embedding_gram_kernel,
            {
                "ids_ptr": "*i64",
                "g_ptr": t,
                "out_ptr": "*fp32",
                "T": "i32",
                "P": "i32",
                "sib": "i64",
                "sit": "i64",
                "sgb": "i64",
                "sgt": "i64",
                "sgp": "i64",
                "padding_idx": "i64",
                "n_t": "i32",
            },
            {"BLOCK_T": 64, "BLOCK_K": 32, "UPCAST": False},
            {"num_warps": GRAM_WARPS},
        )
        for t in _DTYPES
    ],
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
