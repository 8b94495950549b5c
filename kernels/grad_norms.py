"""Triton kernels for per-example squared gradient norms (no autograd; see regops.grad_norms).

* ``gram_kernel``: ghost form. Program (n, ti, tj) with tj >= ti builds the T-tiles (A_i A_j^T) and
  (G_i G_j^T) in registers, one K-chunk at a time, and writes only ``sum((A_i A_j^T) * (G_i G_j^T))``
  (twice for the off-diagonal tiles): no T x T matrix ever reaches memory.
* ``instantiate_kernel``: program (n, d-tile, p-tile) accumulates ``A_n[:, d]^T G_n[:, p]`` over T and writes
  only the sum of its squares: the B x p x d per-example gradients are never written.
* ``embedding_gram_kernel``: the Gram form of an Embedding; the activation Gram is ``[id_t = id_t' != pad]``.

Each program writes one float32 partial; the launcher sums the partials per example (deterministic).
Inputs may have any strides; float32 dots run in IEEE precision (no TF32), bf16/fp16 dots accumulate in fp32.

Grids: the tiles of one example run along x (up to 2**31 - 1 programs: T = 65536 gives 1024**2 Gram tiles,
a 16384 x 16384 Linear 65536 instantiate tiles), the examples along y, in launches of at most 65535 examples.
Offsets are int64: ``t * stride`` passes 2**31 for long sequences of wide layers.
"""

import torch
import triton
import triton.language as tl

from regops._core.launch import MAX_GRID, launch
from regops.reference import grad_norms as _ref


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


def _launch_per_examples(kernel, tiles: int, batched: tuple[torch.Tensor, ...], *args, **meta) -> None:
    """Grid (tiles, examples): ``batched`` tensors (inputs and the ``[B, tiles]`` partials) are sliced along
    dim 0 into launches of at most 65535 examples (CUDA's limit on grid y); strides are unchanged."""
    b = batched[0].shape[0]
    step = MAX_GRID[1]
    for n0 in range(0, b, step):
        chunk = [t[n0 : n0 + step] for t in batched]
        launch(kernel, (tiles, chunk[0].shape[0]), *chunk, *args, device=batched[0].device, **meta)


# Two 64 x 64 float32 Gram tiles per program: on 4 warps the fp32 kernel spilled 88-184 B per thread (sm_90/sm_80);
# on 8 warps it takes ~130-170 registers and no spill (tests/test_kernels_compile.py reports it).
GRAM_WARPS = 8


def _common(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dtype != g.dtype:  # e.g. fp32 activations with bf16 output gradients under autocast
        a, g = a.float(), g.float()
    return a, g


def _upcast(g: torch.Tensor) -> bool:
    return g.dtype == torch.bfloat16 and g.device.type == "cpu"  # CPU tensors: the interpreter


def _blocks(device: torch.device) -> tuple[int, int]:
    # The interpreter pays per program instance: few, large programs. A GPU: 64 x 64 tiles, K-chunks of 32.
    return (64, 64) if device.type == "cpu" else (64, 32)


def gram_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Ghost-form ``[B]`` float32 squared norms of ``G_n^T A_n``; ``a`` ``[B, T, d]``, ``g`` ``[B, T, p]``."""
    if torch.float64 in (a.dtype, g.dtype):
        return _ref.gram_sq_norms(a, g)
    a, g = _common(a, g)
    b, t, d = a.shape
    p = g.shape[2]
    block_t, block_k = _blocks(a.device)
    n_t = triton.cdiv(t, block_t)
    partial = torch.zeros(b, n_t * n_t, dtype=torch.float32, device=a.device)
    if b == 0 or t == 0:
        return partial.sum(1)
    _launch_per_examples(
        gram_kernel,
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
        num_warps=GRAM_WARPS,
    )
    return partial.sum(1)


def instantiate_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Instantiate-form ``[B]`` float32 squared norms of ``G_n^T A_n`` (arguments as ``gram_sq_norms``)."""
    if torch.float64 in (a.dtype, g.dtype):
        return _ref.instantiate_sq_norms(a, g)
    a, g = _common(a, g)
    b, t, d = a.shape
    p = g.shape[2]
    block_t, block_dp = (64, 64) if a.device.type == "cpu" else (32, 64)
    n_d, n_p = triton.cdiv(d, block_dp), triton.cdiv(p, block_dp)
    partial = torch.zeros(b, n_d * n_p, dtype=torch.float32, device=a.device)
    if b == 0 or t == 0 or d == 0 or p == 0:
        return partial.sum(1)
    _launch_per_examples(
        instantiate_kernel,
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


def embedding_gram_sq_norms(ids: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """``[B]`` float32 squared norms of Embedding per-example gradients (ids ``[B, T]``, g ``[B, T, d]``)."""
    if g.dtype == torch.float64:
        return _ref.embedding_gram_sq_norms(ids, g, padding_idx)
    b, t = ids.shape
    p = g.shape[2]
    block_t, block_k = _blocks(g.device)
    n_t = triton.cdiv(t, block_t)
    partial = torch.zeros(b, n_t * n_t, dtype=torch.float32, device=g.device)
    if b == 0 or t == 0:
        return partial.sum(1)
    _launch_per_examples(
        embedding_gram_kernel,
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
        num_warps=GRAM_WARPS,
    )
    return partial.sum(1)


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
]
