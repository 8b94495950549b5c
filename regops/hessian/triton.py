"""The hessian family's Triton launchers: each takes its op's arguments and returns its results. The probes are
bit-identical to :mod:`regops.hessian.reference` (the kernel reads the seed tensor in device memory, so a
CUDA-graph replay draws fresh probes); the accumulation matches it to float rounding. The kernels are in
``regops.kernels.hessian``; every launch goes through :func:`regops._core.launch.launch`.

At scale: the probe grid puts the ``N / BLOCK`` column blocks on x (10**9 parameters: ~10**6 blocks) and the
probes on y, in launches of at most 65535 probes. The accumulation is graph-safe and deterministic: its index
tables are built once per set of tensors (cached on the device; a cache miss under CUDA-graph capture is a
clear error: run one step before capturing), and the per-parameter dots are summed block by block in a fixed
order by a second kernel (no atomics, no ``index_add_``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from regops._core.dtypes import acc_dtype
from regops._core.launch import MAX_GRID, launch
from regops.hessian import reference as ref
from regops.kernels import hessian as K


def _probe_block(numel: int, device: torch.device) -> int:
    # The interpreter pays per program instance; a GPU wants a few elements per thread.
    want = 8192 if device.type == "cpu" else 1024
    return max(128, min(want, triton.next_power_of_2(numel)))


def probes(
    seed: torch.Tensor,
    first_probe: int,
    num_probes: int,
    numel: int,
    distribution: str,
    dtype: torch.dtype,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Probe rows as ``[num_probes, row_stride(numel)]`` on the seed's device (the first ``numel`` columns are
    the probes); ``block`` (columns per program) changes the tiling, never the bits."""
    device = seed.device
    stride = ref.row_stride(numel, distribution)
    out = torch.empty(num_probes, stride, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    block = block or _probe_block(stride, device)
    for k0 in range(0, num_probes, MAX_GRID[1]):
        rows = out[k0 : k0 + MAX_GRID[1]]
        launch(
            K.probes_kernel,
            (triton.cdiv(stride, block), rows.shape[0]),
            rows,
            first_probe + k0,
            stride,
            seed,
            stride // ref.ELEMENTS_PER_COUNTER[distribution],
            device=device,
            GAUSSIAN=distribution == "gaussian",
            BLOCK=block,
            num_warps=4,
            enable_fp_fusion=False,
        )
    return out


def _dot_block(device: torch.device) -> int:
    return 4096 if device.type == "cpu" else 1024


_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}

# Device index tables of probe_dot, keyed by everything they encode (addresses, row strides, sizes, block): a
# hit is correct by construction. Kept so that a step replayed under a CUDA graph copies nothing host-to-device.
_TABLES: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
_TABLES_MAX = 64


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _index_tables(v2: list[torch.Tensor], h2: list[torch.Tensor], block: int, device: torch.device):
    key = (
        str(device),
        block,
        tuple((v.data_ptr(), v.stride(0), v.shape[1]) for v in v2),
        tuple((h.data_ptr(), h.stride(0)) for h in h2),
    )
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    if _capturing(device):
        raise RuntimeError(
            "regops: hessian_probe_dot met new tensors during CUDA-graph capture; its index tables are copied to "
            "the GPU once per set of tensors, which capture forbids. Run the same step once before capturing "
            "(the usual warm-up), so that the capture finds them built."
        )
    tensors, starts, ends, cols, first_block = [], [], [], [], [0]
    offset = 0
    for p, v in enumerate(v2):
        n = v.shape[1]
        for s in range(0, n, block):
            tensors.append(p)
            starts.append(s)
            ends.append(min(s + block, n))
            cols.append(offset + s)
        offset += n
        first_block.append(len(starts))
    per_tensor = [[t.data_ptr() for t in v2], [t.data_ptr() for t in h2], [t.stride(0) for t in v2]]
    per_tensor.append([t.stride(0) for t in h2])
    lists = [*per_tensor, tensors, starts, ends, cols, first_block]
    flat = torch.tensor([x for xs in lists for x in xs], dtype=torch.int64).to(device)  # one copy
    tables = tuple(flat.split([len(xs) for xs in lists]))
    _TABLES[key] = tables
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return tables


def _rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """``[K, n]`` rows with unit column stride (views of a probe buffer keep their row stride)."""
    rows = t.reshape(k, -1)
    return rows if rows.stride(1) == 1 or rows.shape[1] <= 1 else rows.contiguous()


def probe_dot(
    vs: list[torch.Tensor], hvs: list[torch.Tensor], with_diag: bool, *, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused per-parameter ``v . Hv``, ``sum_k v * Hv`` and ``sum_k (v * Hv)^2`` in one launch over every
    parameter tensor (read in place through address tables); the sums are reordered against the reference's, the
    same way on every run."""
    dtype = vs[0].dtype
    device = vs[0].device
    k = vs[0].shape[0]
    acc = acc_dtype(dtype)
    block = block or _dot_block(device)
    v2 = [_rows(v.to(dtype), k) for v in vs]
    h2 = [_rows(h.to(dtype), k) for h in hvs]
    numel = sum(v.shape[1] for v in v2)
    num_blocks = sum(triton.cdiv(v.shape[1], block) for v in v2)
    partial = torch.empty(k, num_blocks, dtype=acc, device=device)
    diag = torch.empty(numel if with_diag else 0, dtype=acc, device=device)
    diag_sq = torch.empty_like(diag)
    dots = torch.empty(k, len(v2), dtype=acc, device=device)
    if num_blocks == 0 or k == 0:
        return dots.zero_(), diag.zero_(), diag_sq.zero_()
    v_ptrs, hv_ptrs, v_strides, hv_strides, tensors, starts, ends, cols, first_block = _index_tables(
        v2, h2, block, device
    )
    launch(
        K.probe_dot_kernel,
        (num_blocks,),
        v_ptrs,
        hv_ptrs,
        v_strides,
        hv_strides,
        tensors,
        starts,
        ends,
        cols,
        partial,
        diag,
        diag_sq,
        k,
        num_blocks,
        device=device,
        DTYPE=_TL_DTYPES[dtype],
        WITH_DIAG=with_diag,
        BLOCK=block,
        num_warps=4,
    )
    launch(
        K.segment_sum_kernel, (len(v2),), partial, first_block, dots, k, num_blocks, len(v2), device=device, BLOCK=256
    )
    return dots, diag, diag_sq
