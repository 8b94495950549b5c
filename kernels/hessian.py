"""Triton kernels of the hessian family: Philox probes for all parameters in one launch, and the fused
accumulation of ``v . Hv`` (per parameter and probe) and ``v * Hv`` (diagonal) in one launch.

Both work on the parameters flattened and concatenated into ``[K, N]`` (``K`` probes, ``N`` numbers): one
launch covers every parameter tensor. The probe stream is specified in :mod:`regops.reference.hessian`; the
kernels reproduce it bit for bit (the Gaussian transform uses only correctly rounded operations, and the
launch disables FMA contraction so a GPU rounds like the reference).
"""

import torch
import triton
import triton.language as tl
from regops.kernels.philox import counter_words
from regops.kernels.utils import cast_rne

from regops.reference import hessian as ref

LN2 = tl.constexpr(ref.LN2)
SQRT2 = tl.constexpr(ref.SQRT2)
TWO_PI = tl.constexpr(ref.TWO_PI)
TWO_POW_M24 = tl.constexpr(ref.TWO_POW_M24)
L0, L1, L2, L3, L4 = (tl.constexpr(c) for c in ref.LOG_COEFFS)
S0, S1, S2, S3, S4, S5, S6 = (tl.constexpr(c) for c in ref.SIN_COEFFS)


@triton.jit
def _log_unit(w):
    """ln(((w >> 8) + 1) 2^-24) for uint32 words, float32 (see regops.reference.hessian.log_unit)."""
    k = ((w >> 8) + 1).to(tl.int32)
    u = k.to(tl.float32) * TWO_POW_M24
    bits = u.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e).to(tl.float32)
    s = tl.div_rn(m - 1.0, m + 1.0)
    s2 = s * s
    p = s2 * L0 + L1
    p = p * s2 + L2
    p = p * s2 + L3
    p = p * s2 + L4
    p = p * s2 + 1.0
    return e * LN2 + (s + s) * p


@triton.jit
def _sin_poly(x):
    x2 = x * x
    p = x2 * S0 + S1
    p = p * x2 + S2
    p = p * x2 + S3
    p = p * x2 + S4
    p = p * x2 + S5
    p = p * x2 + S6
    p = p * x2 + 1.0
    return x * p


@triton.jit
def _box_muller(wa, wb):
    r = tl.sqrt_rn(_log_unit(wa) * -2.0)
    u = (wb >> 8).to(tl.int32).to(tl.float32) * TWO_POW_M24
    t = tl.where(u >= 0.5, u - 1.0, u)
    a = tl.abs(t)
    bc = 0.25 - a
    bs = tl.where(a <= 0.25, t, tl.where(t > 0, 0.5 - t, -0.5 - t))
    return r * _sin_poly(bc * TWO_PI), r * _sin_poly(bs * TWO_PI)


@triton.jit(do_not_specialize=["first_probe", "numel", "seed", "offset", "row_counters"])
def probes_kernel(out_ptr, first_probe, numel, seed, offset, row_counters, GAUSSIAN: tl.constexpr, BLOCK: tl.constexpr):
    """Program (k, b) writes probe row first_probe + k, columns [b BLOCK, (b + 1) BLOCK) of rows of ``numel``
    (the padded row length)."""
    k = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = b * BLOCK + tl.arange(0, BLOCK)
    row_counter = offset + (first_probe + k) * row_counters
    if GAUSSIAN:
        counters = row_counter + b * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
        r0, r1, r2, r3 = counter_words(seed, counters)
        z0, z1 = _box_muller(r0, r1)
        z2, z3 = _box_muller(r2, r3)
        # element 4c + 2m + n takes z_{2m+n} of counter c
        values = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])
    else:
        counters = row_counter + b * (BLOCK // 128) + tl.arange(0, BLOCK // 128).to(tl.int64)
        r0, r1, r2, r3 = counter_words(seed, counters)
        words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK // 32])  # word 4c + w
        bits = (words[:, None] >> tl.arange(0, 32)[None, :].to(tl.uint32)) & 1  # element 32 (4c + w) + bit
        values = 1.0 - 2.0 * tl.reshape(bits, [BLOCK]).to(tl.float32)
    tl.store(out_ptr + k * numel + cols, cast_rne(values, out_ptr.dtype.element_ty), mask=cols < numel)


def _probe_block(numel: int, device: torch.device) -> int:
    # The interpreter pays per program instance; a GPU wants a few elements per thread.
    want = 8192 if device.type == "cpu" else 1024
    return max(128, min(want, triton.next_power_of_2(numel)))


def probes(
    seed: int,
    offset: int,
    first_probe: int,
    num_probes: int,
    numel: int,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Probe rows as ``[num_probes, row_stride(numel)]`` (first ``numel`` columns are the probes);
    bit-identical to :func:`regops.reference.hessian.probes`."""
    device = torch.device(device if device is not None else "cpu")
    stride = ref.row_stride(numel, distribution)
    out = torch.empty(num_probes, stride, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    block = block or _probe_block(stride, device)
    grid = (num_probes, triton.cdiv(stride, block))
    probes_kernel[grid](
        out,
        first_probe,
        stride,
        seed,
        offset,
        stride // ref.ELEMENTS_PER_COUNTER[distribution],
        GAUSSIAN=distribution == "gaussian",
        BLOCK=block,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out


@triton.jit(do_not_specialize=["num_probes", "num_blocks"])
def probe_dot_kernel(
    v_ptrs,
    hv_ptrs,
    v_strides,
    hv_strides,
    block_tensor_ptr,
    block_start_ptr,
    block_end_ptr,
    block_col_ptr,
    partial_ptr,
    diag_ptr,
    diag_sq_ptr,
    num_probes,
    num_blocks,
    DTYPE: tl.constexpr,
    WITH_DIAG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Multi-tensor: program b owns columns [start_b, end_b) of tensor t_b, whose K probe rows are found through
    tables of base addresses and row strides (no packing copy). Per probe it stores the partial v . Hv of its
    block; over probes it writes the column sums of v * Hv and (v * Hv)^2 at the block's place in the
    concatenated [N] outputs."""
    b = tl.program_id(0)
    t = tl.load(block_tensor_ptr + b)
    start = tl.load(block_start_ptr + b)
    end = tl.load(block_end_ptr + b)
    col = tl.load(block_col_ptr + b)
    v_base = tl.load(v_ptrs + t).to(tl.pointer_type(DTYPE))
    hv_base = tl.load(hv_ptrs + t).to(tl.pointer_type(DTYPE))
    v_stride = tl.load(v_strides + t)
    hv_stride = tl.load(hv_strides + t)
    cols = start + tl.arange(0, BLOCK)
    mask = cols < end
    acc_ty = partial_ptr.dtype.element_ty
    diag = tl.zeros([BLOCK], dtype=acc_ty)
    diag_sq = tl.zeros([BLOCK], dtype=acc_ty)
    for k in range(num_probes):
        v = tl.load(v_base + k * v_stride + cols, mask=mask, other=0.0).to(acc_ty)
        hv = tl.load(hv_base + k * hv_stride + cols, mask=mask, other=0.0).to(acc_ty)
        prod = v * hv
        if WITH_DIAG:
            diag += prod
            diag_sq += prod * prod
        tl.store(partial_ptr + k * num_blocks + b, tl.sum(prod, axis=0))
    if WITH_DIAG:
        out = col + tl.arange(0, BLOCK)
        tl.store(diag_ptr + out, diag, mask=mask)
        tl.store(diag_sq_ptr + out, diag_sq, mask=mask)


def _dot_block(device: torch.device) -> int:
    return 4096 if device.type == "cpu" else 1024


_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def probe_dot(
    vs: list[torch.Tensor], hvs: list[torch.Tensor], with_diag: bool = True, *, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused per-parameter ``v . Hv``, ``sum_k v * Hv`` and ``sum_k (v * Hv)^2`` in one launch over every
    parameter tensor (read in place through address tables); matches
    :func:`regops.reference.hessian.probe_dot` to float rounding (the sums are reordered)."""
    dtype = vs[0].dtype
    device = vs[0].device
    k = vs[0].shape[0]
    acc = ref.accumulate_dtype(dtype)
    block = block or _dot_block(device)
    # rows of each tensor: [K, n_p] with unit column stride (views of a probe buffer keep their row stride)
    v2 = [_rows(v.to(dtype), k) for v in vs]
    h2 = [_rows(h.to(dtype), k) for h in hvs]
    sizes = [v.shape[1] for v in v2]
    numel = sum(sizes)
    tensors, starts, ends, cols = [], [], [], []
    offset = 0
    for p, n in enumerate(sizes):
        for s in range(0, n, block):
            tensors.append(p)
            starts.append(s)
            ends.append(min(s + block, n))
            cols.append(offset + s)
        offset += n
    as_i64 = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)
    num_blocks = len(starts)
    partial = torch.empty(k, num_blocks, dtype=acc, device=device)
    diag = torch.empty(numel if with_diag else 0, dtype=acc, device=device)
    diag_sq = torch.empty_like(diag)
    dots = torch.zeros(k, len(sizes), dtype=acc, device=device)
    if num_blocks == 0 or k == 0:
        return dots, diag.zero_(), diag_sq.zero_()
    probe_dot_kernel[(num_blocks,)](
        as_i64([t.data_ptr() for t in v2]),
        as_i64([t.data_ptr() for t in h2]),
        as_i64([t.stride(0) for t in v2]),
        as_i64([t.stride(0) for t in h2]),
        as_i64(tensors),
        as_i64(starts),
        as_i64(ends),
        as_i64(cols),
        partial,
        diag,
        diag_sq,
        k,
        num_blocks,
        DTYPE=_TL_DTYPES[dtype],
        WITH_DIAG=with_diag,
        BLOCK=block,
        num_warps=4,
    )
    return dots.index_add_(1, as_i64(tensors), partial), diag, diag_sq


def _rows(t: torch.Tensor, k: int) -> torch.Tensor:
    rows = t.reshape(k, -1)
    return rows if rows.stride(1) == 1 or rows.shape[1] <= 1 else rows.contiguous()


_OUT = ("*fp32", "*fp64", "*bf16", "*fp16")
_PROBE_SIG = {"first_probe": "i64", "numel": "i64", "seed": "i64", "offset": "i64", "row_counters": "i64"}
COMPILE_SPECS = [
    (probes_kernel, {"out_ptr": t, **_PROBE_SIG}, {"GAUSSIAN": g, "BLOCK": 1024}) for t in _OUT for g in (True, False)
]
_DOT_SIG = {
    "v_ptrs": "*i64",
    "hv_ptrs": "*i64",
    "v_strides": "*i64",
    "hv_strides": "*i64",
    "block_tensor_ptr": "*i64",
    "block_start_ptr": "*i64",
    "block_end_ptr": "*i64",
    "block_col_ptr": "*i64",
}
COMPILE_SPECS += [
    (
        probe_dot_kernel,
        {**_DOT_SIG, "partial_ptr": a, "diag_ptr": a, "diag_sq_ptr": a, "num_probes": "i32", "num_blocks": "i32"},
        {"DTYPE": d, "WITH_DIAG": w, "BLOCK": 1024},
    )
    for d, a in ((tl.float32, "*fp32"), (tl.bfloat16, "*fp32"), (tl.float16, "*fp32"), (tl.float64, "*fp64"))
    for w in (True, False)
]
