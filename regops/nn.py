"""Drop-in modules. Each declares the torch (or third-party) module it can replace, for :func:`regops.patch`."""

from __future__ import annotations

import numbers

import torch
import torch.utils.checkpoint

from regops.dropout import dropout as _dropout_fn
from regops.dropout import fused as _fused
from regops.dropout import structured as _structured
from regops.dropout._core import _dropout_op, runtime_probability

# Module class (or "package.module:Class" for optional dependencies) -> regops class with ``from_module``.
SWAPS: dict[type | str, type] = {}


class _RuntimeProbability:
    """Mixin: the module's probability attribute (``p``, or ``drop_prob``) is mirrored into a 0-dim float64 CPU
    tensor that the ops take, so that under ``torch.compile`` a p schedule (``module.p = new_p`` between steps)
    is a runtime value: no guard on the float, no recompile. In eager mode the float itself is used.

    The tensor is a plain attribute (not a buffer): not in the state_dict, and ``.to(device)`` leaves it on the
    CPU, where reading it costs no device sync.
    """

    _p_attr = "p"

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == self._p_attr:
            if isinstance(value, torch.Tensor):  # the user's own 0-dim tensor: the ops read it directly
                object.__setattr__(self, "_p_runtime", value.detach())
                return
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            number = float(value) if ok else float("nan")  # NaN: the op raises a clear error if it ever runs
            runtime = self.__dict__.get("_p_runtime")
            if runtime is None or runtime.dtype != torch.float64 or runtime.device.type != "cpu":
                object.__setattr__(self, "_p_runtime", torch.tensor(number, dtype=torch.float64))
            else:
                with torch.no_grad():
                    runtime.fill_(number)  # in place: a compiled graph reads it as an input

    def _probability(self):
        """What forward passes as p: the tensor under torch.compile, the float otherwise."""
        return self._p_runtime if torch.compiler.is_compiling() else getattr(self, self._p_attr)


_SHARED_STATE = ("_parameters", "_buffers", "_non_persistent_buffers_set")


def adopt_module_state(new: torch.nn.Module, old: torch.nn.Module) -> torch.nn.Module:
    """Give ``new`` (a regops replacement of ``old``) everything of ``old`` a user may have attached.

    Hook dicts (forward, pre-forward, backward, state_dict hooks, ...) are *shared*, not copied, so hooks
    registered before the swap run on the replacement and their handles still remove them; parameters and
    buffers are shared too, and other attributes a user set are copied over. ``training`` follows ``old``.
    """
    for key, value in old.__dict__.items():
        if "hook" in key or key in _SHARED_STATE:
            new.__dict__[key] = value
        elif key not in new.__dict__:
            new.__dict__[key] = value
    new.train(old.training)
    return new


def swaps(*targets: type | str):
    """Class decorator: ``regops.patch`` replaces instances of exactly ``targets`` with this class."""

    def register(cls: type) -> type:
        if not hasattr(cls, "from_module"):
            raise TypeError(f"{cls.__name__} needs a from_module(module) classmethod to be swappable")
        for target in targets:
            SWAPS[target] = cls
        return cls

    return register


@swaps(torch.nn.Dropout)
class Dropout(_RuntimeProbability, torch.nn.Dropout):
    """:class:`torch.nn.Dropout` (same constructor, repr and state_dict) backed by :func:`regops.dropout`.

    Saves no mask for backward. Still an instance of ``torch.nn.Dropout``, so code that looks for dropout
    modules keeps finding it. Under ``torch.compile`` changing ``p`` between steps never recompiles.

    >>> m = regops.nn.Dropout(p=0.1)
    >>> y = m(torch.randn(4, 16))
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _dropout_fn(input, self._probability(), self.training, self.inplace)

    @classmethod
    def from_module(cls, module: torch.nn.Dropout) -> Dropout:
        """The regops twin of ``module`` with its hooks, state and training flag (what :func:`regops.patch` uses)."""
        return adopt_module_state(cls(p=module.p, inplace=module.inplace), module)


class _ChannelDropoutMixin(_RuntimeProbability):
    _fn = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return type(self)._fn(input, self._probability(), self.training, self.inplace)

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> torch.nn.Module:
        """The regops twin of ``module`` with its hooks, state and training flag (what :func:`regops.patch` uses)."""
        return adopt_module_state(cls(p=module.p, inplace=module.inplace), module)


@swaps(torch.nn.Dropout1d)
class Dropout1d(_ChannelDropoutMixin, torch.nn.Dropout1d):
    """:class:`torch.nn.Dropout1d` backed by :func:`regops.dropout1d` (whole channels; only a seed is saved)."""

    _fn = staticmethod(_structured.dropout1d)


@swaps(torch.nn.Dropout2d)
class Dropout2d(_ChannelDropoutMixin, torch.nn.Dropout2d):
    """:class:`torch.nn.Dropout2d` backed by :func:`regops.dropout2d` (whole channels; only a seed is saved)."""

    _fn = staticmethod(_structured.dropout2d)


@swaps(torch.nn.Dropout3d)
class Dropout3d(_ChannelDropoutMixin, torch.nn.Dropout3d):
    """:class:`torch.nn.Dropout3d` backed by :func:`regops.dropout3d` (whole channels; only a seed is saved)."""

    _fn = staticmethod(_structured.dropout3d)


@swaps("timm.layers:DropPath")
class DropPath(_RuntimeProbability, torch.nn.Module):
    """Stochastic depth with timm's ``DropPath`` constructor, attributes, repr and semantics.

    ``DropPath(drop_prob=0.0, scale_by_keep=True)``: in training, each sample is zeroed with probability
    ``drop_prob`` (survivors scaled by ``1/(1-drop_prob)`` when ``scale_by_keep``); identity in eval.
    Backed by :func:`regops.drop_path`: the per-sample mask is regenerated in backward. Under ``torch.compile``
    changing ``drop_prob`` between steps (a stochastic-depth schedule) never recompiles.

    >>> block_out = regops.nn.DropPath(0.1)(block_out)
    """

    _p_attr = "drop_prob"

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _structured.drop_path(x, self._probability(), self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> DropPath:
        new = cls(drop_prob=module.drop_prob, scale_by_keep=getattr(module, "scale_by_keep", True))
        return adopt_module_state(new, module)


class DropoutAddLayerNorm(_RuntimeProbability, torch.nn.Module):
    """``LayerNorm(dropout(x) + residual)`` (or RMSNorm) as one fused op, :func:`regops.dropout_add_layer_norm`.

    Constructor as flash-attn's ``DropoutAddLayerNorm`` plus ``rms_norm``: parameters ``weight`` (ones) and
    ``bias`` (zeros; absent for RMSNorm unless ``bias=True``). ``forward(x, residual=None)`` returns ``y``, or
    ``(y, new_residual)`` when ``prenorm``.

    >>> norm = regops.nn.DropoutAddLayerNorm(512, p=0.1, prenorm=True)
    >>> y, resid = norm(attn_out, resid)
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
        return _fused.dropout_add_layer_norm(
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


class MultiSampleDropout(_RuntimeProbability, torch.nn.Module):
    """Multi-sample dropout (Inoue 2019): the mean over K dropout masks of ``head(dropout_k(features))``.

    * A linear head (``torch.nn.Linear``, or ``linear_head=True``) is applied once to the features times the
      mean of the K masks (:func:`regops.multi_sample_dropout`): exact, one pass, no K copies.
    * Any other head runs K times, each under activation checkpointing: the masked copy of sample k is
      regenerated from its seed in backward, so at most one masked copy exists at a time.

    :meth:`loss` averages ``loss_fn(head(dropout_k(features)), target)`` over the K samples the same way.
    In eval mode both return the head applied to the features.

    >>> msd = regops.nn.MultiSampleDropout(torch.nn.Linear(768, 10), num_samples=8, p=0.5)
    >>> logits = msd(features); loss = msd.loss(features, labels, torch.nn.functional.cross_entropy)
    """

    def __init__(self, head: torch.nn.Module, num_samples: int = 8, p: float = 0.5, linear_head: bool | None = None):
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"regops: num_samples must be a positive int, got {num_samples!r}")
        self.head, self.num_samples, self.p = head, num_samples, p
        self.linear_head = isinstance(head, torch.nn.Linear) if linear_head is None else linear_head

    def _samples(self, features: torch.Tensor, fn):
        _, seeds = _structured.multi_sample_seeds(features, self.num_samples)
        _, p = runtime_probability(self._probability())
        run = lambda f, s: fn(_dropout_op(f, p, s))
        outs = [torch.utils.checkpoint.checkpoint(run, features, s, use_reentrant=False) for s in seeds]
        return torch.stack(outs).mean(0)

    def _off(self) -> bool:
        # Under torch.compile p is a runtime value: never branch on it (no guard, no recompile).
        return not self.training or (not torch.compiler.is_compiling() and self.p == 0.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self._off():
            return self.head(features)
        if self.linear_head:
            return self.head(_structured.multi_sample_dropout(features, self._probability(), self.num_samples))
        return self._samples(features, self.head)

    def loss(self, features: torch.Tensor, target: torch.Tensor, loss_fn) -> torch.Tensor:
        """Mean over the K samples of ``loss_fn(head(dropout_k(features)), target)``."""
        if self._off():
            return loss_fn(self.head(features), target)
        return self._samples(features, lambda z: loss_fn(self.head(z), target))

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, p={self.p}, linear_head={self.linear_head}"


# ============================================================================================== losses
class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` with regops' fused regularized cross-entropy (:func:`regops.cross_entropy`).

    Takes torch's constructor arguments (``weight``, ``ignore_index``, ``reduction``, ``label_smoothing``; the
    deprecated ``size_average`` / ``reduce`` are rejected) plus regops' own (``maxsup``, ``z_loss``,
    ``confidence_penalty``, ``decoupled``, ``softcap``, ``logit_scale``, ``return_stats``, ``class_dim``). Inputs as
    torch's: ``[N, C]``, ``[C]`` or ``[N, C, d1, ...]`` (classes on dim 1) with index targets, the same rule as
    :func:`regops.cross_entropy`; ``class_dim=-1`` for classes-last logits (``[B, T, V]``). Probability targets go
    to torch's own loss (no regularizers on that path). ``forward(input, target, mix=None, token_weight=None)``.

    Example::

        >>> crit = regops.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> loss = crit(logits, labels)
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: None = None,
        ignore_index: int = -100,
        reduce: None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        maxsup: float = 0.0,
        z_loss: float = 0.0,
        confidence_penalty: float = 0.0,
        decoupled: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        return_stats: bool = False,
        class_dim: int | None = None,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            raise ValueError("regops: size_average and reduce are deprecated in torch; use reduction=")
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.maxsup, self.z_loss, self.confidence_penalty = maxsup, z_loss, confidence_penalty
        self.decoupled, self.softcap, self.logit_scale = decoupled, softcap, logit_scale
        self.return_stats = return_stats
        self.class_dim = class_dim

    def _options(self) -> dict:
        return dict(
            ignore_index=self.ignore_index, reduction=self.reduction, label_smoothing=self.label_smoothing,
            maxsup=self.maxsup, z_loss=self.z_loss, confidence_penalty=self.confidence_penalty,
            decoupled=self.decoupled, softcap=self.softcap, logit_scale=self.logit_scale,
            return_stats=self.return_stats, class_dim=self.class_dim,
        )  # fmt: skip

    def forward(self, input: torch.Tensor, target=None, mix=None, token_weight: torch.Tensor | None = None):
        from regops.losses import cross_entropy

        if isinstance(target, torch.Tensor) and target.is_floating_point():
            if any((self.maxsup, self.z_loss, self.confidence_penalty, self.decoupled, self.return_stats)) or (
                self.softcap is not None or self.logit_scale != 1.0 or mix is not None or token_weight is not None
            ):
                raise ValueError("regops: probability targets take only torch's options; use index labels or mix=")
            if self.class_dim is not None and input.dim() > 2:
                input, target = input.movedim(self.class_dim, 1), target.movedim(self.class_dim, 1)
            return torch.nn.functional.cross_entropy(
                input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                label_smoothing=self.label_smoothing,
            )  # fmt: skip
        return cross_entropy(input, target, weight=self.weight, mix=mix, token_weight=token_weight, **self._options())

    def extra_repr(self) -> str:
        opts = {k: v for k, v in self._options().items() if v not in (0.0, None, False, 1.0, "mean", -100)}
        return ", ".join(f"{k}={v}" for k, v in opts.items())


class LinearCrossEntropyLoss(CrossEntropyLoss):
    """:func:`regops.linear_cross_entropy` as a module: ``loss = crit(hidden, weight, target, bias=None)``.

    Same options as :class:`CrossEntropyLoss` (``weight`` here is the class weight; the classifier's weight is
    an argument of ``forward``, e.g. ``model.lm_head.weight``). The ``[rows, V]`` logits are never built.

    Example::

        >>> crit = regops.nn.LinearCrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
        >>> loss = crit(hidden[:, :-1], model.lm_head.weight, input_ids[:, 1:])
    """

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target=None, bias=None, mix=None, token_weight=None):
        from regops.losses import linear_cross_entropy

        opts = self._options()
        if opts.pop("class_dim") not in (None, -1):
            raise ValueError("regops: the linear form's logits are classes-last by construction (class_dim=-1)")
        return linear_cross_entropy(
            hidden, weight, target, bias, class_weight=self.weight, mix=mix, token_weight=token_weight, **opts
        )  # fmt: skip
