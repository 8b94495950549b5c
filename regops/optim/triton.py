"""The optim family's Triton launchers: each takes its op's arguments and runs one launch per dtype group over all
the tensors of the lists (:mod:`regops.kernels.optim`), through :func:`regops._core.launch.launch`.

The tables a launch reads (one row of addresses per tensor, one row per chunk) are built once per set of tensors
and kept on the device, keyed by everything they encode (addresses, sizes, block): a step replayed under a CUDA
graph copies nothing from the host. A table missing during capture is a clear error (run one step before
capturing). Everything else a kernel reads -- hyper-parameters, per-tensor scalars, seed, ``grad_scale``,
``found_inf`` -- is a device tensor, so no value is frozen into a graph or a compiled program.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton.language as tl

from regops._core.dtypes import acc_dtype
from regops._core.launch import launch
from regops.kernels import optim as K
from regops.optim import reference as ref

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TABLES: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
_TABLES_MAX = 64


def _block(device: torch.device) -> int:
    # The interpreter pays per program instance; a GPU wants a few elements in flight per thread.
    return 2048 if device.type == "cpu" else 1024


def _check(name: str, lists: Sequence[Sequence[torch.Tensor]], device: torch.device) -> None:
    for ts in lists:
        for t in ts:
            if t.device != device:
                raise ValueError(f"regops: {name} takes tensors on one device, got {t.device} and {device}")
            if not t.is_contiguous():
                raise ValueError(f"regops: {name} takes contiguous tensors, got strides {t.stride()}")
            if t.dtype not in _TL:
                raise TypeError(f"regops: {name} takes floating tensors (float32/64, bfloat16, float16), got {t.dtype}")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached(key: tuple, device: torch.device, build) -> tuple[torch.Tensor, ...]:
    """The device tables of ``key`` (``build()`` returns int lists, copied to ``device`` in one transfer)."""
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    if _capturing(device):
        raise RuntimeError(
            "regops: an optim op met new tensors during CUDA-graph capture; its address tables are copied to the GPU "
            "once per set of tensors, which capture forbids. Run the same step once before capturing."
        )
    lists = build()
    flat = torch.tensor([x for xs in lists for x in xs], dtype=torch.int64).to(device)
    tables = tuple(flat.split([len(xs) for xs in lists]))
    _TABLES[key] = tables
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return tables


def _groups(keyed: list[tuple]) -> dict[tuple, list[int]]:
    """Indices of the tensors per dtype key, in list order."""
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keyed):
        groups.setdefault(k, []).append(i)
    return groups


def _chunk_rows(numels: list[int], block: int) -> list[int]:
    rows = []
    for i, n in enumerate(numels):
        for start in range(0, n, block):
            rows += [i, start]
    return rows


def _ptrs(ts: Sequence[torch.Tensor], idx: list[int]) -> list[int]:
    return [ts[i].data_ptr() for i in idx] if ts else [0] * len(idx)


def _elementwise(kernel, columns: list[list[int]], numels: list[int], device, *args, **meta) -> None:
    """One launch of an elementwise ``kernel`` over a table with ``columns`` (one list per column)."""
    block = _block(device)
    key = (kernel.fn.__name__, str(device), block, tuple(map(tuple, columns)))

    def build():
        return [[c[r] for r in range(len(numels)) for c in columns], _chunk_rows(numels, block)]

    table, chunks = _cached(key, device, build)
    n_chunks = chunks.numel() // 2
    launch(kernel, (n_chunks,), table, chunks, *args, device=device, BLOCK=block, num_warps=4, **meta)


def _subset(t: torch.Tensor, idx: list[int], n: int) -> torch.Tensor:
    return t if len(idx) == n else t.index_select(0, torch.tensor(idx, device=t.device))


# ------------------------------------------------------------------------------------------------ the step
def optim_step(
    params, grads, state1, state2, state3, steps, ema, anchors, fishers, restore, row_scales, hyper,
    param_ids, elem_offsets, method, decay, maximize, clip, seed, grad_scale, found_inf,
) -> None:  # fmt: skip
    ref.check_modes(method, decay)
    if not params:
        return
    device = params[0].device
    _check("optim_step", (params, grads, state1, state2, state3, ema, anchors, fishers, restore), device)
    n = len(params)
    scalars = ref.device_step_scalars(hyper, steps, method)
    row_bases, base = [], 0
    for p in params:
        row_bases.append(base)
        base += ref.rows_of(p)
    dummy = scalars
    for (pd, gd), idx in _groups([(p.dtype, g.dtype) for p, g in zip(params, grads, strict=True)]).items():
        numels = [params[i].numel() for i in idx]
        lists = (params, grads, state1, state2, state3, ema, anchors, fishers, restore)
        columns = [_ptrs(ts, idx) for ts in lists] + [
            numels,
            [param_ids[i] for i in idx],
            [elem_offsets[i] for i in idx],
            [row_bases[i] for i in idx],
            [numels[k] // ref.rows_of(params[i]) if numels[k] else 0 for k, i in enumerate(idx)],
        ]
        _elementwise(
            K.optim_step_kernel, columns, numels, device,
            _subset(scalars, idx, n), hyper,
            row_scales if row_scales is not None else dummy,
            seed if seed is not None else dummy,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            P=_TL[pd], G=_TL[gd], CD=_TL[acc_dtype(pd)],
            METHOD=ref.METHODS.index(method), DECAY=ref.DECAYS.index(decay),
            HAS_S1=bool(state1), AMSGRAD=bool(state3), HAS_EMA=bool(ema), HAS_RESTORE=bool(restore),
            HAS_ROWS=row_scales is not None, CLIP=clip, NOISE=seed is not None, HAS_SCALE=grad_scale is not None,
            HAS_INF=found_inf is not None, MAXIMIZE=maximize, enable_fp_fusion=False,
        )  # fmt: skip
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, (found_inf == 0).to(steps[0].dtype))


# ------------------------------------------------------------------------------------------------ SAM
def sam_perturb(params, grads, old_params, old_grads, scales, adaptive, found_inf) -> None:
    if not params:
        return
    device = params[0].device
    _check("optim_sam_perturb", (params, grads, old_params, old_grads), device)
    n = len(params)
    for (pd, gd), idx in _groups([(p.dtype, g.dtype) for p, g in zip(params, grads, strict=True)]).items():
        numels = [params[i].numel() for i in idx]
        columns = [_ptrs(ts, idx) for ts in (params, grads, old_params, old_grads)] + [numels]
        _elementwise(
            K.sam_perturb_kernel, columns, numels, device, _subset(scales, idx, n),
            found_inf if found_inf is not None else scales,
            P=_TL[pd], G=_TL[gd], CD=_TL[acc_dtype(pd, gd)], ADAPTIVE=adaptive, HAS_OLD_GRAD=bool(old_grads),
            HAS_INF=found_inf is not None, enable_fp_fusion=False,
        )  # fmt: skip


def axpby(y, x, coeffs) -> None:
    if not y:
        return
    device = y[0].device
    _check("optim_axpby", (y, x), device)
    for (yd, xd), idx in _groups([(a.dtype, b.dtype) for a, b in zip(y, x, strict=True)]).items():
        numels = [y[i].numel() for i in idx]
        columns = [_ptrs(y, idx), _ptrs(x, idx), numels]
        _elementwise(K.axpby_kernel, columns, numels, device, coeffs, Y=_TL[yd], X=_TL[xd],
                     CD=_TL[acc_dtype(yd, xd)], enable_fp_fusion=False)  # fmt: skip


# ------------------------------------------------------------------------------------------------ reductions
def _segments(numels: list[int], rows: list[int], block: int) -> tuple[list[list[int]], list[int]]:
    """Per tensor, its chunks as (first, end, segment) with the segments (rows) numbered globally from 0; and the
    global first chunk of every segment (plus the end)."""
    per_tensor, first, seg, total = [], [0], 0, 0
    for n, r in zip(numels, rows, strict=True):
        length = n // r if r else 0
        chunks = []
        for k in range(r):
            lo, hi = k * length, (k + 1) * length
            for s in range(lo, hi, max(block, 1)):
                chunks.append((s, min(s + block, hi)))
            total += (hi - lo + block - 1) // block if hi > lo else 0
            first.append(total)
            seg += 1
        per_tensor.append(chunks)
    return per_tensor, first


def dots(a, b, w, rows) -> torch.Tensor:
    device = a[0].device
    _check("optim_dots", (a, b, w), device)
    cd = acc_dtype(*a, *b, *w)
    block = _block(device)
    numels = [x.numel() for x in a]
    row_counts = [ref.rows_of(x) if rows else 1 for x in a]
    n_out = sum(row_counts)
    chunk_lists, first = _segments(numels, row_counts, block)
    partial = torch.empty(first[-1], 3, dtype=cd, device=device)
    slot_of = []  # first global chunk slot of each tensor
    slot = 0
    for chunks in chunk_lists:
        slot_of.append(slot)
        slot += len(chunks)
    keys = [(x.dtype, b[i].dtype if b else None, w[i].dtype if w else None) for i, x in enumerate(a)]
    for (ad, bd, wd), idx in _groups(keys).items():
        columns = [_ptrs(a, idx), _ptrs(b, idx), _ptrs(w, idx)]
        key = ("dots", str(device), block, rows, tuple(map(tuple, columns)), tuple(numels[i] for i in idx))

        def build(idx=idx, columns=columns):
            table = [c[r] for r in range(len(idx)) for c in columns]
            chunk_rows = []
            for k, i in enumerate(idx):
                for j, (lo, hi) in enumerate(chunk_lists[i]):
                    chunk_rows += [k, lo, hi, slot_of[i] + j]
            return [table, chunk_rows]

        table, chunks = _cached(key, device, build)
        n_chunks = chunks.numel() // 4
        launch(
            K.dots_partial_kernel, (n_chunks,), table, chunks, partial, device=device,
            A=_TL[ad], B=_TL[bd] if bd is not None else tl.float32, W=_TL[wd] if wd is not None else tl.float32,
            CD=_TL[cd], HAS_B=bd is not None, HAS_W=wd is not None, BLOCK=block, num_warps=4,
        )  # fmt: skip
    (first_t,) = _cached(("segments", str(device), tuple(first)), device, lambda: [first])
    out = torch.empty(n_out, 3, dtype=cd, device=device)
    launch(K.segment_sums_kernel, (n_out,), partial, first_t, out, device=device, BLOCK=256, num_warps=4)
    return out
