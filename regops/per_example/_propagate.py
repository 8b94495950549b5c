"""The layout of an op's results from the layouts of its inputs (see :mod:`regops.per_example._layout`).

:func:`propagate` returns one tag per result tensor: a :class:`~regops.per_example._layout.Layout`, ``None`` (no
examples), or :class:`Unknown` (the op's effect on the examples' place is not known, or it mixes examples: a sum
over the batch, a softmax along it). Every rule follows the op's own semantics (broadcasting, the dims it reads);
none compares sizes to guess.
"""

from __future__ import annotations

import string
from typing import Any

import torch

from regops.per_example import _layout as L
from regops.per_example._layout import Layout
from regops.per_example._ops_table import DIM_READERS, INDEXED, MATMULS, POINTWISE, REDUCTIONS, ROWS, VIEWS


class Unknown:
    """A tensor whose examples' place is not known (``why`` says which op lost it)."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"Unknown({self.why})"


def _dims(value: Any, ndim: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = [value]
    return [int(d) % ndim if ndim else 0 for d in value]


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if pos < len(args) else default


def _shape_args(args: tuple) -> tuple:
    """``view(2, 3)`` and ``view((2, 3))`` alike."""
    rest = args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return tuple(rest[0])
    return tuple(rest)


def propagate(name: str, args: tuple, kwargs: dict, found: list, out: Any) -> list:
    """Tags of the tensors of ``out`` (flattened in order), given the tagged inputs ``found`` (``(path, tensor,
    tag)`` with a Layout or Unknown tag)."""
    outs = _tensors(out)
    if name in INDEXED and name != "embedding":
        data = [f for f in found if f[0] == ("a", 0)]
        if not data:  # a constant indexed by tensors with examples
            return [_by_index(name, args, kwargs, found, o) for o in outs]
        found = data
    unknown = [tag for _, _, tag in found if isinstance(tag, Unknown)]
    if unknown:
        return [unknown[0]] * len(outs)
    xs = [(path, t, tag) for path, t, tag in found if isinstance(tag, Layout)]
    if not xs:
        return [None] * len(outs)
    try:
        tags = _propagate(name, args, kwargs, xs, outs)
    except _Lost as e:
        tags = [Unknown(f"{name}: {e}")] * len(outs)
    return tags


class _Lost(Exception):
    pass


def _by_index(name: str, args: tuple, kwargs: dict, found: list, out: torch.Tensor) -> Layout | Unknown:
    """``table[ids]`` (one index tensor) and ``table.index_select(dim, ids)``: the examples of the index, in place."""
    tags = [tag for _, _, tag in found]
    if len(found) != 1 or not isinstance(tags[0], Layout):
        return Unknown(f"{name}: indices with examples")
    (path, ids, layout) = found[0]
    if name == "__getitem__" and path == ("a", 1):
        return layout
    if name == "index_select" and ids.dim() == 1:
        return layout.at(int(_arg(args, kwargs, 1, "dim")) % out.dim())
    return Unknown(f"{name}: indices with examples")


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _one(xs: list, what: str = "") -> tuple[torch.Tensor, Layout]:
    _, t, layout = xs[0]
    return t, layout


def _propagate(name: str, args: tuple, kwargs: dict, xs: list, outs: list[torch.Tensor]) -> list:
    if not outs:
        return []
    if name in POINTWISE or (name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor)):
        return [_broadcast(xs, o) for o in outs]
    if name.endswith("_") and name[:-1] in POINTWISE | {"add", "sub", "mul", "div"}:
        return [_broadcast(xs, o) for o in outs]
    if name in DIM_READERS:
        t, layout = _one(xs)
        key, pos, default = DIM_READERS[name]
        dims = _dims(_arg(args, kwargs, pos, key, default), t.dim())
        if dims is None and name in ("flip", "roll"):
            raise _Lost("over all dims, the batch's included")
        if dims is not None and layout.dim in dims:
            raise _Lost("along the examples' dim")
        return [layout if o.dim() == t.dim() else Unknown(name) for o in outs]
    if name in REDUCTIONS:
        return _reduction(name, args, kwargs, xs, outs)
    if name in VIEWS:
        return _view(name, args, kwargs, xs, outs)
    if name in MATMULS:
        return [_matmul(name, args, kwargs, xs, outs[0])] + [Unknown(name)] * (len(outs) - 1)
    if name in ROWS or name == "batch_norm":
        t, layout = _one(xs)
        if xs[0][0] != ("a", 0) or layout.dim != 0:
            raise _Lost("the examples are not in the leading dim of its input")
        return [layout] * len(outs)
    if name in ("layer_norm", "rms_norm"):
        t, layout = _one(xs)
        shape = _arg(args, kwargs, 1, "normalized_shape")
        k = 1 if isinstance(shape, int) else len(shape)
        if xs[0][0] != ("a", 0) or layout.dim >= t.dim() - k:
            raise _Lost("normalizes over the examples' dim")
        return [layout] * len(outs)
    if name == "pad":
        t, layout = _one(xs)
        pad = _arg(args, kwargs, 1, "pad")
        if layout.dim >= t.dim() - len(pad) // 2:
            raise _Lost("pads the examples' dim")
        return [layout] * len(outs)
    if name in ("embedding", "one_hot"):
        (path, t, layout) = xs[0]
        if path != ("a", 0):
            raise _Lost("the examples are in the table")
        return [layout] * len(outs)
    if name in ("cat", "concat", "concatenate", "stack"):
        return [_cat(name, args, kwargs, xs, outs[0])]
    if name == "scaled_dot_product_attention":
        return [_sdpa(args, kwargs, xs, outs[0])]
    raise _Lost("an op whose effect on the examples is not known")


def _broadcast(xs: list, out: torch.Tensor) -> Layout:
    result = None
    for _, t, layout in xs:
        d = L.aligned_dim(layout, t.dim(), out.dim())
        if t.shape[layout.dim] != out.shape[d]:  # one example broadcast along the dim
            layout = Layout(d, layout.batch, outer=out.shape[d]) if layout.size == 1 else None
            if layout is None:
                raise _Lost("the examples' dim is broadcast")
        layout = layout.at(d)
        if result is None:
            result = layout
        elif not result.same(layout):
            raise _Lost("inputs whose examples are in different places")
    return result


def _reduction(name, args, kwargs, xs, outs):
    t, layout = _one(xs)
    dim = _arg(args, kwargs, 1, "dim")
    if name in ("max", "min") and dim is None:
        raise _Lost("over all dims, the batch's included")
    if isinstance(dim, torch.Tensor) or (name in ("norm",) and not isinstance(dim, (int, list, tuple))):
        dim = _arg(args, kwargs, 2, "dim")
    dims = _dims(dim, t.dim())
    if dims is None or layout.dim in dims:
        raise _Lost("over the examples' dim")
    keep = bool(_arg(args, kwargs, 2 if name not in ("norm", "vector_norm") else 3, "keepdim", False))
    new = layout if keep else L.removed(layout, dims)
    return [new if o.dim() == (t.dim() if keep else t.dim() - len(dims)) else Unknown(name) for o in outs]


def _view(name, args, kwargs, xs, outs):
    (path, t, layout) = xs[0]
    if path != ("a", 0):
        if name in ("index_select", "gather", "take_along_dim"):
            raise _Lost("an index that carries examples")
        raise _Lost("an argument that carries examples")
    out = outs[0]
    n = t.dim()
    if name in ("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"):
        if name == "view" and len(args) == 2 and isinstance(args[1], torch.dtype):
            raise _Lost("a view as another dtype")
        new = L.reshaped(layout, tuple(t.shape), tuple(out.shape))
        if new is None:
            raise _Lost("a reshape that splits the examples' dim")
        return [new]
    if name in ("expand", "expand_as", "broadcast_to"):
        d = L.aligned_dim(layout, n, out.dim())
        if out.shape[d] != t.shape[layout.dim]:
            if layout.size != 1:
                raise _Lost("expands the examples' dim")
            return [Layout(d, layout.batch, outer=out.shape[d])]
        return [layout.at(d)]
    if name in ("repeat", "tile"):
        reps = _shape_args(args)
        extra = out.dim() - n
        r = reps[layout.dim + extra] if layout.dim + extra < len(reps) else 1
        if layout.index is not None and r != 1:
            raise _Lost("repeats an explicit examples' dim")
        return [Layout(layout.dim + extra, layout.batch, layout.inner, layout.outer * r, layout.index)]
    if name == "unsqueeze":
        d = int(_arg(args, kwargs, 1, "dim")) % out.dim()
        return [L.inserted(layout, d)]
    if name == "squeeze":
        dims = _dims(_arg(args, kwargs, 1, "dim"), n)
        gone = [i for i in (range(n) if dims is None else dims) if t.shape[i] == 1]
        if layout.dim in gone:
            raise _Lost("squeezes the examples' dim")
        return [L.removed(layout, gone)]
    if name in ("permute", "transpose", "t", "T", "mT", "movedim", "moveaxis", "swapaxes", "swapdims"):
        return [L.permuted(layout, _perm(name, args, kwargs, n))]
    if name in ("narrow", "select"):
        d = int(_arg(args, kwargs, 1, "dim")) % n
        if d == layout.dim:
            if name == "narrow" and out.shape[d] == t.shape[d]:
                return [layout]
            raise _Lost("selects examples")
        return [layout if name == "narrow" else L.removed(layout, [d])]
    if name in ("split", "chunk", "unbind", "tensor_split", "split_with_sizes"):
        pos = 2 if name != "unbind" else 1
        d = int(_arg(args, kwargs, pos, "dim", 0)) % n
        if d == layout.dim:
            raise _Lost("splits the examples")
        return [L.removed(layout, [d]) if name == "unbind" else layout for _ in outs]
    if name == "index_select":
        d = int(_arg(args, kwargs, 1, "dim")) % n
        if d != layout.dim:
            return [layout]
        index = _arg(args, kwargs, 2, "index").reshape(-1).cpu()
        return [L.normalized(Layout(d, layout.batch, index=layout.example_index()[index]))]
    if name in ("gather", "take_along_dim"):
        d = _arg(args, kwargs, 2 if name == "take_along_dim" else 1, "dim")
        if d is None or int(d) % n == layout.dim or out.dim() != n:
            raise _Lost("gathers along the examples' dim")
        return [layout]
    if name == "__getitem__":
        return [_getitem(t, layout, args[1], out)]
    raise _Lost("a view")


def _perm(name: str, args: tuple, kwargs: dict, n: int) -> list[int]:
    perm = list(range(n))
    if name == "permute":
        return [int(d) % n for d in _shape_args(args)]
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = int(_arg(args, kwargs, 1, "dim0")) % n, int(_arg(args, kwargs, 2, "dim1")) % n
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name in ("t", "T", "mT"):
        if n >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
        if name == "T":
            perm = list(reversed(range(n)))
        return perm
    src, dst = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
    src, dst = _dims(src, n), _dims(dst, n)
    rest = [d for d in range(n) if d not in src]
    out: list[int | None] = [None] * n
    for s, d in zip(src, dst, strict=True):
        out[d] = s
    it = iter(rest)
    return [d if d is not None else next(it) for d in out]


def _getitem(t: torch.Tensor, layout: Layout, index: Any, out: torch.Tensor) -> Layout:
    """Basic indexing (ints, slices, None, Ellipsis) and advanced indexing whose index tensors avoid the examples'
    dim, or pick every example once in order (``x[torch.arange(B), lengths - 1]``)."""
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(i.dim() if _is_bool(i) else 1 for i in items if i is not None and i is not Ellipsis)
    ellipsis = [k for k, i in enumerate(items) if i is Ellipsis]
    if ellipsis:
        k = ellipsis[0]
        items = items[:k] + [slice(None)] * (t.dim() - consumed) + items[k + 1 :]
    else:
        items += [slice(None)] * (t.dim() - consumed)
    in_dim, out_dim, advanced, new_dim = 0, 0, [], None
    for i in items:
        if i is None:
            out_dim += 1
            continue
        if isinstance(i, slice):
            if in_dim == layout.dim:
                whole = i.start in (None, 0) and i.step in (None, 1) and (i.stop is None or i.stop >= t.shape[in_dim])
                if not whole:
                    raise _Lost("slices examples")
                new_dim = out_dim
            in_dim += 1
            out_dim += 1
            continue
        if isinstance(i, int) or (isinstance(i, torch.Tensor) and i.dim() == 0 and not _is_bool(i)):
            if in_dim == layout.dim:
                raise _Lost("selects one example")
            in_dim += 1
            continue
        if _is_bool(i):
            raise _Lost("a boolean mask")
        advanced.append((in_dim, out_dim, i))
        in_dim += 1
        out_dim += 1
    if not advanced:
        if new_dim is None:
            raise _Lost("an index")
        return layout.at(new_dim)
    dims = [d for d, _, _ in advanced]
    adv_ndim = len(torch.broadcast_shapes(*[torch.as_tensor(i).shape for _, _, i in advanced]))
    adjacent = dims == list(range(dims[0], dims[0] + len(dims)))
    start = advanced[0][1] if adjacent else 0
    if layout.dim in dims:  # must be torch.arange(B), the examples in order, against 1-D indices
        idx = torch.as_tensor(advanced[dims.index(layout.dim)][2])
        if adv_ndim != 1 or idx.dim() != 1 or not layout.plain:
            raise _Lost("an index along the examples' dim")
        if not torch.equal(idx.cpu(), torch.arange(layout.batch)):
            raise _Lost("an index that reorders examples")
        return Layout(start, layout.batch)
    if new_dim is None:
        raise _Lost("an index")
    # the advanced dims' place in the output: where the first of them was (adjacent) or in front (apart)
    before = sum(1 for d in dims if d < layout.dim)
    if adjacent:
        return layout.at(new_dim + (adv_ndim - len(dims) if before else 0))
    return layout.at(new_dim - sum(1 for _, o, _ in advanced if o < new_dim) + adv_ndim)


def _is_bool(i: Any) -> bool:
    return isinstance(i, torch.Tensor) and i.dtype == torch.bool


def _matmul(name: str, args: tuple, kwargs: dict, xs: list, out: torch.Tensor) -> Layout:
    if name == "einsum":
        return _einsum(args, xs, out)
    if name == "linear":
        (path, t, layout) = xs[0]
        if path != ("a", 0) or any(p != ("a", 0) for p, _, _ in xs) or layout.dim == t.dim() - 1:
            raise _Lost("examples in the weight or the features")
        return layout
    if name in ("addmm", "baddbmm", "addbmm"):  # bias + a @ b: the bias broadcasts like a pointwise input
        mats = [(("a", p[1] - 1) if p[0] == "a" else p, t, lay) for p, t, lay in xs if p != ("a", 0)]
        res = _matmul("bmm" if name == "baddbmm" else "mm", args[1:], kwargs, mats, out) if mats else None
        bias = [(p, t, lay) for p, t, lay in xs if p == ("a", 0)]
        if bias:
            b = _broadcast(bias, out)
            if res is not None and not b.same(res):
                raise _Lost("bias and product with examples in different places")
            res = res or b
        if name == "addbmm" and res is not None:
            raise _Lost("a sum over the batch of products")
        return res
    result = None
    b = args[1]
    nd = out.dim()
    for path, t, layout in xs:
        which = path[1] if path[0] == "a" else (0 if path[1] in ("input", "self") else 1)
        nt = t.dim()
        d = layout.dim
        if nt == 1:
            raise _Lost("a vector operand with examples")
        if which == 0:
            if d == nt - 1:
                raise _Lost("contracts the examples' dim")
            o = nd - 2 if (d == nt - 2 and b.dim() > 1) else (nd - 1 if d == nt - 2 else d + (nd - nt))
        else:
            if d == nt - 2:
                raise _Lost("contracts the examples' dim")
            o = nd - 1 if d == nt - 1 else d + (nd - nt)
        new = layout.at(o)
        if result is not None and not result.same(new):
            raise _Lost("operands with examples in different places")
        result = new
    return result


def _einsum(args: tuple, xs: list, out: torch.Tensor) -> Layout:
    eq = args[0].replace(" ", "")
    if "..." in eq:
        raise _Lost("an ellipsis equation")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if not rhs:
        rhs = "".join(sorted(c for c in set(lhs) if c in string.ascii_letters and lhs.count(c) == 1))
    result = None
    for path, _t, layout in xs:
        k = path[2] if len(path) > 2 else path[1] - 1
        letter = terms[k][layout.dim]
        if letter not in rhs:
            raise _Lost("sums over the examples' dim")
        new = layout.at(rhs.index(letter))
        if result is not None and not result.same(new):
            raise _Lost("operands with examples in different places")
        result = new
    return result


def _cat(name: str, args: tuple, kwargs: dict, xs: list, out: torch.Tensor) -> Layout:
    d = int(_arg(args, kwargs, 1, "dim", 0))
    result = None
    for _path, t, layout in xs:
        nd = t.dim()
        dim = d % (nd + 1 if name == "stack" else nd)
        if name == "stack":
            new = L.inserted(layout, dim)
        else:
            if dim == layout.dim:
                raise _Lost("concatenates along the examples' dim")
            new = layout
        if result is not None and not result.same(new):
            raise _Lost("inputs whose examples are in different places")
        result = new
    return result


def _sdpa(args: tuple, kwargs: dict, xs: list, out: torch.Tensor) -> Layout:
    """``softmax(q k^T + mask) v``: the examples of q (its leading dims or its query rows), k and v (leading dims
    only) and the mask (broadcast against the scores) must agree."""
    result = None
    names = ("query", "key", "value", "attn_mask")
    for path, t, layout in xs:
        which = path[1] if path[0] == "a" else names.index(path[1])
        if which == 3:
            scores = out.dim()
            d = L.aligned_dim(layout, t.dim(), scores)
            if d >= scores - 1:
                raise _Lost("a mask with examples along the keys")
            new = layout.at(d)
        else:
            d = layout.dim + (out.dim() - t.dim())
            if d == out.dim() - 1 or (which != 0 and d == out.dim() - 2):
                raise _Lost("examples along the features or the keys")
            new = layout.at(d)
        if result is not None and not result.same(new):
            raise _Lost("query, key and value with examples in different places")
        result = new
    return result
