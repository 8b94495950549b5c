"""The dropout family's modules: drop-ins for torch's and timm's dropout modules (swapped in by
:func:`regops.patch`), the fused dropout + residual + LayerNorm, and multi-sample dropout."""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from regops._core.modules import RuntimeProbability, adopt_module_state, swaps
from regops._core.validate import runtime_probability
from regops.dropout import api, ops
from regops.dropout._multi_sample import multi_sample_seeds

__all__ = ["DropPath", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "DropoutAddLayerNorm", "MultiSampleDropout"]


@swaps(torch.nn.Dropout)
class Dropout(RuntimeProbability, torch.nn.Dropout):
    """`torch.nn.Dropout` (same constructor, repr and state_dict) backed by `regops.dropout`.

    Saves no mask for backward. Still an instance of ``torch.nn.Dropout``, so code that looks for dropout
    modules keeps finding it. Under ``torch.compile`` changing ``p`` between steps never recompiles.

    Args:
        p: the drop probability, in ``[0, 1]`` (a number or a 0-dim tensor; may change between steps).
        inplace: write the result into the input.

    Example::

        >>> m = regops.nn.Dropout(p=0.1)
        >>> m(torch.randn(4, 16)).shape
        torch.Size([4, 16])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return api.dropout(input, self._probability(), self.training, self.inplace)

    @classmethod
    def from_module(cls, module: torch.nn.Dropout) -> Dropout:
        """The regops twin of ``module`` with its hooks, state and training flag (what `regops.patch` uses)."""
        return adopt_module_state(cls(p=module.p, inplace=module.inplace), module)


class _ChannelDropoutMixin(RuntimeProbability):
    _fn = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return type(self)._fn(input, self._probability(), self.training, self.inplace)

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> torch.nn.Module:
        """The regops twin of ``module`` with its hooks, state and training flag (what :func:`regops.patch` uses)."""
        return adopt_module_state(cls(p=module.p, inplace=module.inplace), module)


@swaps(torch.nn.Dropout1d)
class Dropout1d(_ChannelDropoutMixin, torch.nn.Dropout1d):
    """`torch.nn.Dropout1d` backed by `regops.dropout1d` (whole channels; only a seed is saved).

    Args:
        p: the probability of zeroing a channel, in ``[0, 1]``.
        inplace: write the result into the input.

    Example::

        >>> regops.nn.Dropout1d(0.5)(torch.randn(2, 4, 10)).shape  # [N, C, L]
        torch.Size([2, 4, 10])
    """

    _fn = staticmethod(api.dropout1d)


@swaps(torch.nn.Dropout2d)
class Dropout2d(_ChannelDropoutMixin, torch.nn.Dropout2d):
    """`torch.nn.Dropout2d` backed by `regops.dropout2d` (whole channels; only a seed is saved).

    Args:
        p: the probability of zeroing a channel, in ``[0, 1]``.
        inplace: write the result into the input.

    Example::

        >>> regops.nn.Dropout2d(0.5)(torch.randn(2, 4, 6, 6)).shape  # [N, C, H, W]
        torch.Size([2, 4, 6, 6])
    """

    _fn = staticmethod(api.dropout2d)


@swaps(torch.nn.Dropout3d)
class Dropout3d(_ChannelDropoutMixin, torch.nn.Dropout3d):
    """`torch.nn.Dropout3d` backed by `regops.dropout3d` (whole channels; only a seed is saved).

    Args:
        p: the probability of zeroing a channel, in ``[0, 1]``.
        inplace: write the result into the input.

    Example::

        >>> regops.nn.Dropout3d(0.5)(torch.randn(2, 4, 3, 6, 6)).shape  # [N, C, D, H, W]
        torch.Size([2, 4, 3, 6, 6])
    """

    _fn = staticmethod(api.dropout3d)


@swaps("timm.layers:DropPath")
class DropPath(RuntimeProbability, torch.nn.Module):
    """Stochastic depth with timm's ``DropPath`` constructor, attributes, repr and semantics.

    ``DropPath(drop_prob=0.0, scale_by_keep=True)``: in training, each sample is zeroed with probability
    ``drop_prob`` (survivors scaled by ``1/(1-drop_prob)`` when ``scale_by_keep``); identity in eval.
    Backed by `regops.drop_path`: the per-sample mask is regenerated in backward. Under ``torch.compile``
    changing ``drop_prob`` between steps (a stochastic-depth schedule) never recompiles.

    Args:
        drop_prob: the probability of zeroing a sample (may change between steps).
        scale_by_keep: scale the kept samples by ``1/(1-drop_prob)``.

    Example::

        >>> block_out = regops.nn.DropPath(0.1)(torch.randn(4, 8))
        >>> block_out.shape
        torch.Size([4, 8])
    """

    _p_attr = "drop_prob"

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return api.drop_path(x, self._probability(), self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> DropPath:
        new = cls(drop_prob=module.drop_prob, scale_by_keep=getattr(module, "scale_by_keep", True))
        return adopt_module_state(new, module)


class DropoutAddLayerNorm(RuntimeProbability, torch.nn.Module):
    """``LayerNorm(dropout(x) + residual)`` (or RMSNorm) as one fused op, `regops.dropout_add_layer_norm`.

    Constructor as flash-attn's ``DropoutAddLayerNorm`` plus ``rms_norm``: parameters ``weight`` (ones) and
    ``bias`` (zeros; absent for RMSNorm unless ``bias=True``). ``forward(x, residual=None)`` returns ``y``, or
    ``(y, new_residual)`` when ``prenorm``.

    Args:
        hidden_size: the normalised (last) dim.
        prenorm: also return the new residual ``dropout(x) + residual``.
        p: the drop probability (may change between steps).
        eps: the normalisation's epsilon.
        residual_in_fp32: keep the returned residual in float32.
        rms_norm: RMSNorm instead of LayerNorm.
        bias: a bias parameter (default: for LayerNorm, not for RMSNorm).
        device: where the parameters live.
        dtype: the parameters' dtype.

    Example::

        >>> norm = regops.nn.DropoutAddLayerNorm(8, p=0.1, prenorm=True)
        >>> attn_out, resid = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        >>> y, resid = norm(attn_out, resid)
        >>> y.shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self,
        hidden_size: int,
        prenorm: bool = False,
        p: float = 0.0,
        eps: float = 1e-5,
        residual_in_fp32: bool = False,
        rms_norm: bool = False,
        bias: bool | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.prenorm, self.p, self.eps = prenorm, p, eps
        self.residual_in_fp32, self.rms_norm = residual_in_fp32, rms_norm
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, **factory))
        use_bias = (not rms_norm) if bias is None else bias
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, **factory)) if use_bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return api.dropout_add_layer_norm(
            x,
            residual,
            self.weight,
            self.bias,
            self._probability(),
            self.eps,
            rms_norm=self.rms_norm,
            prenorm=self.prenorm,
            residual_in_fp32=self.residual_in_fp32,
            training=self.training,
        )

    def extra_repr(self) -> str:
        kind = "rms_norm" if self.rms_norm else "layer_norm"
        return f"{self.weight.shape[0]}, p={self.p}, eps={self.eps}, {kind}, prenorm={self.prenorm}"


class MultiSampleDropout(RuntimeProbability, torch.nn.Module):
    """Multi-sample dropout (Inoue 2019): the mean over K dropout masks of ``head(dropout_k(features))``.

    * A linear head (``torch.nn.Linear``, or ``linear_head=True``) is applied once to the features times the
      mean of the K masks (`regops.multi_sample_dropout`): exact, one pass, no K copies.
    * Any other head runs K times, each under activation checkpointing: the masked copy of sample k is
      regenerated from its seed in backward, so at most one masked copy exists at a time.

    `loss` averages ``loss_fn(head(dropout_k(features)), target)`` over the K samples the same way.
    In eval mode both return the head applied to the features.

    Args:
        head: the module applied after dropout (a ``torch.nn.Linear`` takes the one-pass path).
        num_samples: K, the number of dropout masks.
        p: the drop probability (may change between steps).
        linear_head: treat ``head`` as linear (default: whether it is a ``torch.nn.Linear``).

    Example::

        >>> msd = regops.nn.MultiSampleDropout(torch.nn.Linear(16, 3), num_samples=8, p=0.5)
        >>> features, labels = torch.randn(4, 16), torch.tensor([0, 1, 2, 0])
        >>> logits = msd(features)
        >>> loss = msd.loss(features, labels, torch.nn.functional.cross_entropy)
        >>> logits.shape, loss.shape
        (torch.Size([4, 3]), torch.Size([]))
    """

    def __init__(self, head: torch.nn.Module, num_samples: int = 8, p: float = 0.5, linear_head: bool | None = None):
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"regops: num_samples must be a positive int, got {num_samples!r}")
        self.head, self.num_samples, self.p = head, num_samples, p
        self.linear_head = isinstance(head, torch.nn.Linear) if linear_head is None else linear_head

    def _samples(self, features: torch.Tensor, fn):
        _, seeds = multi_sample_seeds(features, self.num_samples)
        _, p = runtime_probability(self._probability())
        run = lambda f, s: fn(ops.dropout(f, p, s))
        outs = [torch.utils.checkpoint.checkpoint(run, features, s, use_reentrant=False) for s in seeds]
        return torch.stack(outs).mean(0)

    def _off(self) -> bool:
        # Under torch.compile p is a runtime value: never branch on it (no guard, no recompile).
        return not self.training or (not torch.compiler.is_compiling() and self.p == 0.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self._off():
            return self.head(features)
        if self.linear_head:
            return self.head(api.multi_sample_dropout(features, self._probability(), self.num_samples))
        return self._samples(features, self.head)

    def loss(self, features: torch.Tensor, target: torch.Tensor, loss_fn) -> torch.Tensor:
        """Mean over the K samples of ``loss_fn(head(dropout_k(features)), target)``."""
        if self._off():
            return loss_fn(self.head(features), target)
        return self._samples(features, lambda z: loss_fn(self.head(z), target))

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, p={self.p}, linear_head={self.linear_head}"
