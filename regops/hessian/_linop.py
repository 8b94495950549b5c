"""The loss Hessian as a linear operator (``H @ v``), as curvlinops users expect, on the estimators' engines."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from regops.hessian._hvp import HVP_METHODS
from regops.hessian._inputs import DEFAULT_PROBE_BATCH, _operator, _resolve


class HessianLinearOperator:
    r"""``v -> H v`` for the Hessian ``H`` of a scalar loss w.r.t. the trainable params, ``N x N``.

    Built from the same forms as `regops.hessian.trace` (``(loss_fn, params)``, ``(model, criterion,
    inputs, targets)``, ``(model, criterion, loader)``: the batch-size-weighted mean over the loader's batches)
    and computed by the same engines (``hvp``: batched double backward, forward-over-reverse, loop, or
    finite differences; attention on its math backend; one fixed dropout mask per batch in train mode). A single
    batch keeps its forward and first backward between products.

    Vectors: a ``[N]`` tensor (the trainable params flattened and concatenated in order) gives ``[N]``; a
    ``[N, K]`` matrix (columns are vectors, as in curvlinops and SciPy) gives ``[N, K]`` (its ``K`` products are
    batched, ``probe_batch`` at a time); a list of tensors shaped like the trainable params gives such a list.
    A NumPy array gives a NumPy array. Products are in the params' common dtype.

    Attributes: ``shape`` ``(N, N)``, ``dtype``, ``device``, ``names`` (the trainable params' names, the order of
    the flattening) and ``num_matvecs`` (products computed so far).

    Args:
        loss_fn: a model (then ``params`` is its criterion and ``data`` the inputs and targets, or a loader), or
            a function of the parameters returning the loss (then ``params`` are those tensors).
        params: the criterion, or the parameters (a sequence or dict of tensors).
        *data: ``inputs, targets`` or a loader, for a model.
        hvp: the Hessian-vector product engine: ``"auto"``, ``"double_backward"``, ``"forward_over_reverse"``,
            ``"loop"`` or ``"finite_difference"``.
        probe_batch: products batched together.
        fd_eps: the finite-difference step (default: from the params' dtype).

    Example::

        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> H = regops.hessian.HessianLinearOperator(model, nn.CrossEntropyLoss(), x, y)
        >>> N = H.shape[0]
        >>> hv = H @ torch.randn(N)  # [N]
        >>> HV = H.matmat(torch.randn(N, 3))  # [N, K]
        >>> hv_list = H.matvec([torch.randn_like(p) for p in model.parameters()])
        >>> N, hv.shape, HV.shape
        (67, torch.Size([67]), torch.Size([67, 3]))
    """

    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor] | nn.Module,
        params: Any = None,
        *data: Any,
        hvp: str = "auto",
        probe_batch: int = DEFAULT_PROBE_BATCH,
        fd_eps: float | None = None,
    ) -> None:
        if hvp not in HVP_METHODS:
            raise ValueError(f"regops: hvp must be one of {HVP_METHODS}, got {hvp!r}")
        if isinstance(probe_batch, bool) or not isinstance(probe_batch, int) or probe_batch < 1:
            raise ValueError(f"regops: probe_batch must be an int >= 1, got {probe_batch!r}")
        self._problem = _resolve(loss_fn, params, data)
        self._layout = self._problem.layout
        self._op = _operator(self._problem, hvp, probe_batch, fd_eps)

    @property
    def shape(self) -> tuple[int, int]:
        return (self._layout.numel, self._layout.numel)

    @property
    def dtype(self) -> torch.dtype:
        return self._layout.dtype

    @property
    def device(self) -> torch.device:
        return self._layout.device

    @property
    def names(self) -> tuple[str, ...]:
        return self._problem.names

    @property
    def num_matvecs(self) -> int:
        return self._op.num_matvecs

    @property
    def engine(self) -> str:
        """The HVP engine in use (after any fallback)."""
        return self._op.engine

    @property
    def fd_error(self) -> float | None:
        """Estimated relative error of the finite-difference products so far (``None`` when an exact engine ran)."""
        return self._op.fd_error

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``[K, N] -> [K, N]``."""
        return self._op.matmat(rows.to(device=self.device, dtype=self.dtype))

    def matmat(self, m: Any) -> Any:
        """``[N, K] -> [N, K]`` (tensor or NumPy array)."""
        if not isinstance(m, torch.Tensor):
            import numpy as np

            if isinstance(m, np.ndarray):
                return self.matmat(torch.from_numpy(m)).cpu().numpy()
            raise TypeError(f"regops: expected a tensor [N, K], got {type(m).__name__}")
        if m.dim() != 2 or m.shape[0] != self.shape[0]:
            raise ValueError(f"regops: expected a matrix [N, K] with N = {self.shape[0]}, got {tuple(m.shape)}")
        if m.shape[1] == 0:
            return m.new_zeros(m.shape, dtype=self.dtype, device=self.device)
        return self._rows(m.T).T

    def matvec(self, v: Any) -> Any:
        """``[N] -> [N]``, ``[N, K] -> [N, K]``, or a list of per-param tensors -> a list (NumPy in, NumPy out)."""
        if isinstance(v, torch.Tensor):
            if v.dim() == 1:
                return self.matmat(v[:, None])[:, 0]
            return self.matmat(v)
        if isinstance(v, (Sequence, Mapping)) and not isinstance(v, str):
            parts = [v[n] for n in self.names] if isinstance(v, Mapping) else list(v)
            params = self._problem.params
            if len(parts) != len(params) or any(
                not isinstance(t, torch.Tensor) or t.shape != p.shape for t, p in zip(parts, params, strict=False)
            ):
                raise ValueError(
                    f"regops: expected one tensor per trainable param with shapes {[tuple(p.shape) for p in params]}"
                )
            hv = self._op.apply(
                [t.to(device=self.device, dtype=p.dtype)[None] for t, p in zip(parts, params, strict=True)]
            )
            out = [h[0] for h in hv]
            return dict(zip(self.names, out, strict=True)) if isinstance(v, Mapping) else out
        return self.matmat(v) if getattr(v, "ndim", 1) == 2 else self.matmat(v[:, None])[:, 0]

    def __matmul__(self, v: Any) -> Any:
        return self.matvec(v)

    def to_dense(self) -> torch.Tensor:
        """The whole ``[N, N]`` Hessian (``N`` products: small models only)."""
        return self.matmat(torch.eye(self.shape[0], dtype=self.dtype, device=self.device))

    def __repr__(self) -> str:
        return f"HessianLinearOperator(shape={self.shape}, dtype={self.dtype}, engine={self.engine!r})"
