"""Vocabulary-parallel cross-entropy: :func:`regops.cross_entropy` of logits sharded over the class dim, and
:func:`regops.linear_cross_entropy` of a classifier sharded over its rows (the classes).

Tensor-parallel LM heads (Megatron, torchtitan's ``loss_parallel``) give logits as a DTensor with ``Shard(class
dim)`` on one mesh dim (``Replicate()`` on the others). Each rank works on its own columns only; per call, per
row (``N`` rows, one float each unless said):

1. an all-reduce MAX of the local maxima of the (scaled, capped) logits ``z``;
2. one all-reduce SUM of a few stacked ``[N]`` columns: ``sum exp(z - max)``, the targets' logits (a masked
   local pick: a target's column lives on one rank), and as the options need them ``sum z`` (label smoothing,
   MaxSup), ``sum w z`` (label smoothing with class weights), ``sum exp(z - max) z`` (confidence penalty);
3. with MaxSup only, an all-reduce MIN of the global argmax candidates (the first index of the maximum).

The backward is local (the row gradient ``softmax - onehot`` and its regularizer terms, restricted to this
rank's columns): no communication, and nothing of the full ``[N, V]`` exists on any rank. The result is a plain
tensor (the same value on every rank of the mesh): ``loss.backward()`` works, it adds to other plain losses, and
``loss.item()`` needs no ``full_tensor()``; the gradient reaches the logits as a DTensor with their placements.

Logits sharded over the rows as well (``Shard`` on a leading dim, on other mesh dims) take targets and token
weights of the whole batch: each rank slices its rows, computes their losses, and ``"mean"`` / ``"sum"`` add
the partial sums (and the mean's denominators) over the row-sharding mesh dims, one all-reduce of a scalar each;
``"none"`` gives the per-row losses as a DTensor sharded like the rows.

``linear_cross_entropy`` with the weight ``[V, H]`` sharded over its rows (``ColwiseParallel``'s LM head) forms
each rank's columns of the logits ``hidden @ weight_local.T + bias_local`` one block of rows at a time (the same
blocks on every rank), each block with the statistics and all-reduces above; the backward recomputes each block's
logits, forms the local ``d weight`` / ``d bias`` shards, and all-reduces ``d hidden`` (one SUM of ``[N, H]``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor, Replicate

from regops._core.dtensor import box, check, contiguous_strides
from regops._core.dtypes import acc_dtype
from regops.losses import ops
from regops.losses._class_dim import check_weight_dtype, classes_last
from regops.losses._options import LossOptions
from regops.losses._targets import Targets, loss_options, no_grad_needed, prepare, reduce_rows
from regops.losses.reference import transform


def _plain(t: Any, name: str, logits: DTensor) -> Any:
    """A target / weight given as a DTensor on the logits' mesh, as the plain full tensor (``[V]`` class weights
    sharded like the classes are all-gathered: ``V`` floats)."""
    if not isinstance(t, DTensor):
        return t
    if t.device_mesh != logits.device_mesh:
        raise ValueError(f"regops: {name} is on a different device mesh than the logits")
    check(t, name)
    return t.to_local() if all(isinstance(p, Replicate) for p in t.placements) else t.full_tensor()


def _mesh_dims(logits: DTensor) -> tuple[int | None, list[int]]:
    """The mesh dim that shards the classes (last dim of ``logits``; ``None`` if none does) and those that shard
    the rows (the leading dims)."""
    check(logits, "logits")
    classes, rows = None, []
    for md, pl in enumerate(logits.placements):
        if isinstance(pl, Replicate):
            continue
        if pl.dim % logits.dim() != logits.dim() - 1:
            rows.append(md)
        elif classes is not None:
            raise NotImplementedError(
                "regops: cross_entropy of DTensor logits takes the classes sharded over one mesh dim, got "
                f"{tuple(logits.placements)}"
            )
        else:
            classes = md
    return classes, rows


def _rows_of(t: Any, lead_box: tuple[slice, ...]) -> Any:
    """This rank's rows of a target / token weight given for the whole (global) batch."""
    if isinstance(t, (tuple, list)):
        return tuple(_rows_of(x, lead_box) for x in t)
    return t[lead_box] if isinstance(t, torch.Tensor) and t.dim() >= len(lead_box) else t


def cross_entropy(
    logits: DTensor,
    target: Any,
    *,
    weight: Any,
    token_weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float | None,
    maxsup: float,
    z_loss: float,
    confidence_penalty: float,
    mix: Any,
    decoupled: float,
    softcap: float | None,
    logit_scale: float,
    return_stats: bool,
    class_dim: int | None,
) -> torch.Tensor:
    """:func:`regops.cross_entropy` of DTensor logits (see the module docstring)."""
    if return_stats:
        raise NotImplementedError("regops: return_stats is not supported for DTensor logits")
    if decoupled:
        raise NotImplementedError("regops: decoupled mixup is not supported for DTensor logits")
    target = _plain(target, "target", logits)
    if isinstance(target, (tuple, list)):
        target = tuple(_plain(t, "target", logits) for t in target)
    weight, token_weight = _plain(weight, "weight", logits), _plain(token_weight, "token_weight", logits)
    if logits.dim() == 0:
        raise ValueError("regops: logits must have a class dim ([C], [N, C] or [N, C, d1, ...]), got a 0-d tensor")
    logits = classes_last(logits, target, class_dim)
    options = loss_options(
        label_smoothing, maxsup, z_loss, confidence_penalty, decoupled, softcap, logit_scale, reduction, mix
    )
    no_grad_needed(weight=weight, token_weight=token_weight, target=target)
    check_weight_dtype(weight, "weight", logits.dtype)
    class_md, row_mds = _mesh_dims(logits)
    lead, n_classes = logits.shape[:-1], logits.shape[-1]
    local = logits.to_local()
    shape, offset = box(logits)
    if row_mds:  # rows sharded too: each rank takes its rows of the (global) targets
        if mix is not None:
            raise NotImplementedError("regops: mix is not supported for DTensor logits sharded over the rows")
        lead_box = tuple(slice(o, o + n) for o, n in zip(offset[:-1], shape[:-1], strict=True))
        target, token_weight = _rows_of(target, lead_box), _rows_of(token_weight, lead_box)
    local_lead = local.shape[:-1]
    tg = prepare(
        local_lead, n_classes, local.device, acc_dtype(logits.dtype), target, mix, ignore_index, weight, token_weight,
        0.0,
    )  # fmt: skip
    if class_md is None:  # whole rows on every rank
        rows, _, _ = ops.cross_entropy(
            local.reshape(-1, n_classes), tg.index, tg.tweight, tg.row_weight, tg.class_weight, options.values(), False
        )
    else:
        group = logits.device_mesh.get_group(class_md)
        x = local.reshape(local_lead.numel(), local.shape[-1])
        rows = _ShardedRows.apply(x, tg, options, offset[-1], n_classes, group)
    if not row_mds:
        return reduce_rows(rows, reduction, tg.denominator, lead)
    mesh = logits.device_mesh
    if reduction == "none":
        placements = [p if md in row_mds else Replicate() for md, p in enumerate(logits.placements)]
        return DTensor.from_local(
            rows.reshape(local_lead), mesh, placements, shape=lead, stride=tuple(contiguous_strides(lead))
        )
    groups = [mesh.get_group(md) for md in row_mds]
    total = _SumOverRanks.apply(rows.sum(), groups)
    if reduction == "sum":
        return total
    denominator = torch.as_tensor(tg.denominator, dtype=total.dtype, device=total.device).clone()
    for group in groups:
        _all_reduce(denominator, dist.ReduceOp.SUM, group)
    return reduce_rows(total.reshape(1), "mean", denominator, lead)


class _SumOverRanks(torch.autograd.Function):
    """The sum of every rank's (row-shard) partial loss; each rank's part gets the loss's upstream gradient as is
    (the loss is one value, held by every rank)."""

    @staticmethod
    def forward(ctx, part, groups):
        total = part.detach().clone()
        for group in groups:
            _all_reduce(total, dist.ReduceOp.SUM, group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


class _RowStats(NamedTuple):
    """What a block of rows keeps for its backward: ``O(rows)`` numbers (and the option constants)."""

    lse: torch.Tensor
    omega: torch.Tensor
    c_sp: torch.Tensor
    c_row: torch.Tensor
    row_weight: torch.Tensor
    local_index: torch.Tensor
    owned: torch.Tensor
    mean_p_z: torch.Tensor | None
    argmax: torch.Tensor | None


def _sharded_rows(
    z: torch.Tensor, index, tweight, row_weight, cw, o: LossOptions, offset: int, n_classes: int, group
) -> tuple[torch.Tensor, _RowStats]:
    """Per-row losses (``row_weight * row``, :mod:`regops.losses.reference`) of the transformed logits ``z`` ``[N,
    V_local]`` (columns ``offset ...`` of ``n_classes``), with the all-reduces of the module docstring."""
    acc = z.dtype
    n, width = z.shape
    cw_local = None if cw is None else cw[offset : offset + width]
    omega = tweight.to(acc) if cw is None else tweight.to(acc) * cw[index]
    c_sp = omega.sum(1)
    c_row = c_sp if cw is not None else torch.ones_like(c_sp)
    local_max = z.amax(1) if width else torch.full((n,), float("-inf"), dtype=acc, device=z.device)
    zmax = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
    e = torch.exp(z - zmax[:, None])
    local_index = index - offset
    owned = (local_index >= 0) & (local_index < width)
    picked = z.gather(1, local_index.clamp(0, width - 1)) if width else torch.zeros_like(omega)
    cols = [e.sum(1), (torch.where(owned, picked, 0.0) * omega).sum(1)]
    want_sum_z = bool(o.smoothing or o.maxsup)
    if want_sum_z:
        cols.append(z.sum(1))
    if o.smoothing and cw is not None:
        cols.append(z @ cw_local)
    if o.confidence:
        cols.append((e * z).sum(1))
    sums = _all_reduce(torch.stack(cols, 1), dist.ReduceOp.SUM, group).unbind(1)
    lse = zmax + sums[0].log()
    row = c_sp * lse - sums[1]
    more = iter(sums[2:])
    mean_z = next(more) / n_classes if want_sum_z else None
    if o.smoothing:
        uniform = (cw.sum() * lse - next(more)) / n_classes if cw is not None else lse - mean_z
        row = row * (1.0 - o.smoothing) + o.smoothing * uniform
    reg = torch.zeros_like(row)
    argmax = None
    if o.maxsup:
        reg += o.maxsup * (zmax - mean_z)
        # the first index of the global maximum (the single-process op's argmax)
        first = z.argmax(1) + offset if width else torch.zeros(n, dtype=torch.long, device=z.device)
        candidate = torch.where(local_max == zmax, first, n_classes)
        argmax = _all_reduce(candidate, dist.ReduceOp.MIN, group)
    if o.z_loss:
        reg += o.z_loss * lse.square()
    mean_p_z = next(more) / sums[0] if o.confidence else None
    if o.confidence:
        reg -= o.confidence * (lse - mean_p_z)
    rw = row_weight.to(acc)
    rows = (row + c_row * reg) * rw
    return rows, _RowStats(lse, omega, c_sp, c_row, rw, local_index, owned, mean_p_z, argmax)


def _sharded_rows_grad(
    z: torch.Tensor, st: _RowStats, grad_rows: torch.Tensor, cw, o: LossOptions, offset: int, n_classes: int
) -> torch.Tensor:
    """The gradient of ``sum(grad_rows * rows)`` with respect to the untransformed logits of the columns of ``z``
    (in ``z``'s precision): local, no communication."""
    acc = z.dtype
    width = z.shape[1]
    cw_local = None if cw is None else cw[offset : offset + width]
    a = o.smoothing
    p = torch.exp(z - st.lse[:, None])
    coef = (1.0 - a) * st.c_sp
    if a:
        coef = coef + a * (cw.sum() / n_classes if cw is not None else 1.0)
    if o.z_loss:
        coef = coef + st.c_row * (2.0 * o.z_loss) * st.lse
    dz = p * coef[:, None]
    if o.confidence:
        dz += (st.c_row * o.confidence)[:, None] * p * (z - st.mean_p_z[:, None])
    if width:
        dz.scatter_add_(1, st.local_index.clamp(0, width - 1), torch.where(st.owned, -(1.0 - a) * st.omega, 0.0))
    if a:
        dz -= a * (cw_local / n_classes if cw_local is not None else 1.0 / n_classes)
    if o.maxsup:
        dz -= (st.c_row * o.maxsup / n_classes)[:, None]
        hit = st.argmax - offset
        mine = (hit >= 0) & (hit < width)
        if width:
            dz.scatter_add_(1, hit.clamp(0, width - 1)[:, None], torch.where(mine, st.c_row * o.maxsup, 0.0)[:, None])
    dz *= (grad_rows.to(acc) * st.row_weight)[:, None]
    if o.softcap:
        dz *= o.scale * (1.0 - (z / o.softcap).square())
    elif o.scale != 1.0:
        dz *= o.scale
    return dz


class _ShardedRows(torch.autograd.Function):
    """Per-row losses of column-sharded logits ``x`` ``[N, V_local]`` (columns ``offset ...`` of ``n_classes``);
    the backward is local."""

    @staticmethod
    def forward(ctx, x, tg: Targets, o: LossOptions, offset: int, n_classes: int, group) -> torch.Tensor:
        z = transform(x.to(acc_dtype(x)), o.scale, o.softcap)
        rows, ctx.stats = _sharded_rows(
            z, tg.index, tg.tweight, tg.row_weight, tg.class_weight, o, offset, n_classes, group
        )
        ctx.save_for_backward(x)
        ctx.extra = (tg.class_weight, o, offset, n_classes)
        return rows

    @staticmethod
    @once_differentiable  # the all-reduced row statistics carry no graph: no exact second derivative
    def backward(ctx, grad_rows):
        (x,) = ctx.saved_tensors
        cw, o, offset, n_classes = ctx.extra
        z = transform(x.to(acc_dtype(x)), o.scale, o.softcap)
        return _sharded_rows_grad(z, ctx.stats, grad_rows, cw, o, offset, n_classes).to(x.dtype), *(None,) * 5


def _vocab_mesh_dim(weight: DTensor, bias: Any) -> int:
    """The one mesh dim that shards the classifier's rows (``Shard(0)``; ``Replicate()`` elsewhere), checked
    against the bias (``None`` or a DTensor sharded alike)."""
    check(weight, "weight")
    dims = [md for md, pl in enumerate(weight.placements) if not isinstance(pl, Replicate)]
    if len(dims) != 1 or weight.placements[dims[0]].dim % 2 != 0:
        raise NotImplementedError(
            "regops: linear_cross_entropy of a DTensor weight takes it sharded over its rows (the classes, Shard(0)) "
            f"on one mesh dim and Replicate() elsewhere (ColwiseParallel), got {tuple(weight.placements)}"
        )
    if bias is not None and (
        not isinstance(bias, DTensor)
        or bias.device_mesh != weight.device_mesh
        or tuple(bias.placements) != tuple(weight.placements)
    ):
        raise ValueError("regops: the bias of a DTensor weight must be a DTensor sharded like the weight's rows")
    return dims[0]


def linear_cross_entropy(
    hidden: Any,
    weight: DTensor,
    target: Any,
    bias: Any,
    *,
    options: LossOptions,
    class_weight: Any,
    token_weight: Any,
    ignore_index: int,
    reduction: str,
    mix: Any,
    return_stats: bool,
) -> torch.Tensor:
    """:func:`regops.linear_cross_entropy` with the classifier's rows (the classes) sharded over one mesh dim: each
    rank forms the logits of its classes one block of rows at a time (as the single-process form), the row
    statistics take the all-reduces of :func:`cross_entropy`, and ``d hidden`` one all-reduce SUM per call."""
    if return_stats:
        raise NotImplementedError("regops: return_stats is not supported for a DTensor weight")
    if options.decoupled:
        raise NotImplementedError("regops: decoupled mixup is not supported for a DTensor weight")
    if not isinstance(weight, DTensor):
        raise NotImplementedError(
            "regops: linear_cross_entropy of DTensors takes the weight as a DTensor sharded over the classes "
            "(vocabulary parallel); got a plain weight"
        )
    md = _vocab_mesh_dim(weight, bias)
    mesh = weight.device_mesh
    if isinstance(hidden, DTensor):
        if hidden.device_mesh != mesh or not all(isinstance(p, Replicate) for p in hidden.placements):
            raise NotImplementedError(
                "regops: linear_cross_entropy of a DTensor weight takes hidden as a plain tensor or a Replicate() "
                f"DTensor on the weight's mesh, got {tuple(hidden.placements)}"
            )
        hidden = hidden.to_local()  # its gradient comes back replicated: every rank forms the same one
    target = _plain(target, "target", weight)
    if isinstance(target, (tuple, list)):
        target = tuple(_plain(t, "target", weight) for t in target)
    class_weight, token_weight = (
        _plain(class_weight, "class_weight", weight),
        _plain(token_weight, "token_weight", weight),
    )
    no_grad_needed(class_weight=class_weight, token_weight=token_weight, target=target)
    check_weight_dtype(class_weight, "class_weight", hidden.dtype)
    lead, n_classes = hidden.shape[:-1], weight.shape[0]
    _, offset = box(weight)
    tg = prepare(
        lead, n_classes, hidden.device, acc_dtype(hidden.dtype), target, mix, ignore_index, class_weight,
        token_weight, 0.0,
    )  # fmt: skip
    local_bias = None if bias is None else bias.to_local()
    rows = _ShardedLinearRows.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight.to_local(), local_bias, tg, options, offset[0], n_classes,
        mesh.get_group(md),
    )  # fmt: skip
    return reduce_rows(rows, reduction, tg.denominator, lead)


BLOCK_NUMBERS = 1 << 24  # one [block, V_local] block of logits at a time: 64 MiB in float32, as one process


def _row_blocks(n: int, width: int) -> list[slice]:
    step = max(1, BLOCK_NUMBERS // max(width, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _ShardedLinearRows(torch.autograd.Function):
    """Per-row losses of ``hidden @ weight.T + bias`` for this rank's classifier rows (classes ``offset ...``),
    a block of rows at a time; the backward recomputes each block's logits and all-reduces ``d hidden``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tg: Targets, o: LossOptions, offset: int, n_classes: int, group):
        acc = acc_dtype(hidden)
        w, b = weight.to(acc), None if bias is None else bias.to(acc)
        # the same blocks on every rank (each block takes collectives): sized by the largest shard's width
        width = -(-n_classes // dist.get_world_size(group))
        blocks, rows, stats = _row_blocks(hidden.shape[0], width), [], []
        for blk in blocks:
            z = transform(torch.nn.functional.linear(hidden[blk].to(acc), w, b), o.scale, o.softcap)
            r, st = _sharded_rows(
                z, tg.index[blk], tg.tweight[blk], tg.row_weight[blk], tg.class_weight, o, offset, n_classes, group
            )
            rows.append(r)
            stats.append(st)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.extra = (blocks, stats, tg.class_weight, o, offset, n_classes, group)
        return torch.cat(rows) if rows else hidden.new_zeros(0, dtype=acc)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        hidden, weight, bias = ctx.saved_tensors
        blocks, stats, cw, o, offset, n_classes, group = ctx.extra
        acc = acc_dtype(hidden)
        w, b = weight.to(acc), None if bias is None else bias.to(acc)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for blk, st in zip(blocks, stats, strict=True):
            h = hidden[blk].to(acc)
            z = transform(torch.nn.functional.linear(h, w, b), o.scale, o.softcap)
            dz = _sharded_rows_grad(z, st, grad_rows[blk], cw, o, offset, n_classes)
            if need_h:
                dh[blk] = dz @ w
            if need_w:
                dw += dz.T @ h
            if need_b:
                db += dz.sum(0)
        if need_h:  # every rank's classes add to each row's gradient (requires_grad is the same on every rank)
            dh = _all_reduce(dh, dist.ReduceOp.SUM, group).to(hidden.dtype)
        return (
            dh,
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            *(None,) * 5,
        )
