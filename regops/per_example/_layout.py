"""Where the examples are in a tensor, and how that follows the tensor through reshapes, permutes and indexing.

A :class:`Layout` says which dim of a tensor holds the examples and how its positions map to them. The batch of
``B`` examples is declared once, at the model's inputs (their ``batch_dim``), and every tensor computed from them
carries a layout derived from its inputs' by the op's own semantics, never from sizes that happen to match:

* plain: dim ``d`` has size ``B``, position ``i`` is example ``i``;
* structured: dim ``d`` has size ``outer * B * inner``, position ``i`` is example ``(i // inner) % B``; a flatten of
  ``[B, T, d]`` to ``[B * T, d]`` gives ``inner = T``, a sequence-first flatten ``[T * B, d]`` gives ``outer = T``,
  a window partition ``[B * nW, ...]`` gives ``inner = nW``;
* explicit: ``index[i]`` is the example of position ``i`` (packed sequences: rows in time-major order).

Reshapes and views keep the row-major order of the elements, so the examples' place in the flat index, ``(flat //
stride) % B``, is what they carry from input to output: a layout follows any view whose output has one dim holding
that factor whole, and is lost (``None``) otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Layout:
    """Examples of a tensor: in dim ``dim``, ``batch`` of them, position ``i`` belonging to example
    ``(i // inner) % batch`` (``size = outer * batch * inner``) or, when ``index`` is set, to ``index[i]``."""

    dim: int
    batch: int
    inner: int = 1
    outer: int = 1
    index: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.index.numel() if self.index is not None else self.outer * self.batch * self.inner

    @property
    def plain(self) -> bool:
        return self.index is None and self.inner == 1 and self.outer == 1

    def at(self, dim: int) -> Layout:
        return self if dim == self.dim else Layout(dim, self.batch, self.inner, self.outer, self.index)

    def same(self, other: Layout) -> bool:
        """The same examples at the same positions (same dim)."""
        if self.dim != other.dim or self.batch != other.batch:
            return False
        if self.index is None and other.index is None:
            return self.inner == other.inner and self.outer == other.outer
        return self.size == other.size and torch.equal(self.example_index(), other.example_index())

    def example_index(self, device: torch.device | None = None) -> torch.Tensor:
        """The example of every position of the dim, ``[size]`` int64."""
        if self.index is not None:
            return self.index if device is None else self.index.to(device)
        i = torch.arange(self.size, device=device)
        return torch.div(i, self.inner, rounding_mode="floor") % self.batch

    def __repr__(self) -> str:
        if self.index is not None:
            return f"Layout(dim={self.dim}, B={self.batch}, explicit {self.size})"
        return f"Layout(dim={self.dim}, B={self.batch}, inner={self.inner}, outer={self.outer})"


def plain(dim: int, batch: int) -> Layout:
    return Layout(dim, batch)


def normalized(layout: Layout) -> Layout:
    """An explicit index that is the plain order ``0..B-1`` becomes the plain layout (a sort undone)."""
    if layout.index is not None and layout.index.numel() == layout.batch:
        if torch.equal(layout.index.cpu(), torch.arange(layout.batch)):
            return Layout(layout.dim, layout.batch)
    return layout


# ----------------------------------------------------------------------------------------------- views
def reshaped(layout: Layout, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Layout | None:
    """The layout after a reshape/view from ``in_shape`` to ``out_shape`` (row-major order kept), or ``None``
    when the examples' factor is split across output dims."""
    n = len(in_shape)
    d = layout.dim % n if n else 0
    stride_in = math.prod(in_shape[d + 1 :])  # flat-index stride of one step along the layout's dim
    if layout.index is None:
        lo = stride_in * layout.inner  # the batch factor occupies flat strides [lo, lo * B)
        hi = lo * layout.batch
        for e in range(len(out_shape)):
            p_e = math.prod(out_shape[e + 1 :])
            span = p_e * out_shape[e]
            if lo % p_e == 0 and span % hi == 0 and p_e <= lo:
                return Layout(e, layout.batch, lo // p_e, span // hi)
        return None
    lo, hi = stride_in, stride_in * layout.size  # the whole dim must stay in one output dim
    for e in range(len(out_shape)):
        p_e = math.prod(out_shape[e + 1 :])
        span = p_e * out_shape[e]
        if lo % p_e == 0 and span % hi == 0 and p_e <= lo:
            rep_inner, rep_outer = lo // p_e, span // hi
            index = layout.index.repeat_interleave(rep_inner).repeat(rep_outer)
            return normalized(Layout(e, layout.batch, index=index))
    return None


def permuted(layout: Layout, perm: list[int]) -> Layout:
    n = len(perm)
    perm = [p % n for p in perm]
    return layout.at(perm.index(layout.dim % n))


def inserted(layout: Layout, dim: int) -> Layout:
    """After a new dim at ``dim`` (of the output)."""
    return layout.at(layout.dim + 1) if dim <= layout.dim else layout


def removed(layout: Layout, dims: list[int]) -> Layout | None:
    """After removing ``dims`` (of the input); ``None`` if the layout's own dim is removed."""
    if layout.dim in dims:
        return None
    return layout.at(layout.dim - sum(1 for d in dims if d < layout.dim))


def aligned_dim(layout: Layout, ndim_in: int, ndim_out: int) -> int:
    """Broadcasting aligns trailing dims: the output dim of the input's layout dim."""
    return layout.dim + (ndim_out - ndim_in)


# ----------------------------------------------------------------------------------------------- grouping
def batch_first(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``t`` with the examples in a new leading dim of size ``B``: ``[B, rows, *rest]`` where the other dims before
    the layout's dim and its ``rows`` positions per example follow (a view where the layout is structured; explicit
    layouts are gathered, examples with fewer positions padded with zeros, which add nothing to any gradient)."""
    t = t.movedim(layout.dim, 0)
    if layout.index is None:
        t = t.unflatten(0, (layout.outer, layout.batch, layout.inner)).movedim(1, 0)  # [B, outer, inner, *rest]
        return t.flatten(1, 2)
    index = layout.index.to(t.device)
    counts = torch.bincount(index, minlength=layout.batch)
    rows = int(counts.max().item()) if index.numel() else 0
    order = torch.argsort(index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(index)
    pos[order] = torch.arange(index.numel(), device=t.device) - starts[index[order]]
    out = t.new_zeros(layout.batch, rows, *t.shape[1:])
    out[index, pos] = t
    return out


def batch_first_rows(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``t`` as ``[B, positions of the example (all other dims but the last), last dim]`` for rules that act on
    the last dim (Linear, Embedding output, LayerNorm over the last dim)."""
    bf = batch_first(t, layout)
    return bf.reshape(bf.shape[0], -1, bf.shape[-1]) if bf.dim() >= 2 else bf


def per_example_sum(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Sum over each example's positions along the layout's dim: ``[B, *t.shape without that dim]``."""
    return batch_first(t, layout).sum(1)
