"""The kernel-backed operators of the family: ``regops::grad_norms_gram``, ``regops::grad_norms_instantiate``
and ``regops::grad_norms_embedding_gram`` (reference in :mod:`regops.reference.grad_norms`, Triton kernels in
``regops.kernels.grad_norms``), registered as torch.library custom ops with fake impls."""

from __future__ import annotations

import torch

from regops import _backend
from regops.reference import grad_norms as _ref

# ----------------------------------------------------------------------------------------------- operators
_backend.register("grad_norms_gram", torch=_ref.gram_sq_norms, triton="regops.kernels.grad_norms:gram_sq_norms")
_backend.register(
    "grad_norms_instantiate",
    torch=_ref.instantiate_sq_norms,
    triton="regops.kernels.grad_norms:instantiate_sq_norms",
)
_backend.register(
    "grad_norms_embedding_gram",
    torch=_ref.embedding_gram_sq_norms,
    triton="regops.kernels.grad_norms:embedding_gram_sq_norms",
)


def _norm_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


@torch.library.custom_op("regops::grad_norms_gram", mutates_args=())
def _gram_op(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _backend.implementation("grad_norms_gram", a.device)(a, g)


@_gram_op.register_fake
def _(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], dtype=_norm_dtype(a, g))


@torch.library.custom_op("regops::grad_norms_instantiate", mutates_args=())
def _instantiate_op(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _backend.implementation("grad_norms_instantiate", a.device)(a, g)


@_instantiate_op.register_fake
def _(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], dtype=_norm_dtype(a, g))


@torch.library.custom_op("regops::grad_norms_embedding_gram", mutates_args=())
def _embedding_gram_op(ids: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    return _backend.implementation("grad_norms_embedding_gram", g.device)(ids, g, padding_idx)


@_embedding_gram_op.register_fake
def _(ids: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    return g.new_empty(g.shape[0], dtype=_norm_dtype(g))


def _not_differentiable(ctx, grad):  # norms are statistics of a backward pass, not part of a graph
    raise RuntimeError("regops: per-example gradient norm operators are not differentiable")


for _op in (_gram_op, _instantiate_op):
    _op.register_autograd(_not_differentiable, setup_context=lambda ctx, inputs, output: None)
_embedding_gram_op.register_autograd(_not_differentiable, setup_context=lambda ctx, inputs, output: None)


def gram_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms ``||G_n^T A_n||_F^2`` by the ghost form (a ``[B, T, d]``, g ``[B, T, p]``)."""
    return _gram_op(a, g)


def instantiate_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms ``||G_n^T A_n||_F^2`` by the instantiate form (arguments as the ghost form)."""
    return _instantiate_op(a, g)


def embedding_gram_sq_norms(ids: torch.Tensor, g: torch.Tensor, padding_idx: int = -1) -> torch.Tensor:
    """``[B]`` squared norms of Embedding per-example gradients by the id-equality Gram (ids ``[B, T]``)."""
    return _embedding_gram_op(ids, g, padding_idx)
