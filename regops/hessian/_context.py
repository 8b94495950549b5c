"""What every Hessian-vector product runs under: attention that can be differentiated twice, losses whose
backward has a forward-mode derivative, and dropout masks that stay fixed across every forward of a batch.

* ``twice_differentiable()``: ``F.scaled_dot_product_attention`` on its math backend. The fused SDPA kernels
  (flash, memory-efficient, cuDNN, and the CPU flash kernel HF models pick by default) have no double backward
  ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); the math
  backend is plain matmuls and a softmax, exact to rounding, so the Hessian is the same function's Hessian.
  Inside it, the losses whose fused torch kernels cannot be differentiated twice in some mode are rewritten
  into elementwise torch ops (same values to rounding): ``F.mse_loss`` (``nn.MSELoss``: its
  ``mse_loss_backward`` crashes under forward-mode AD with ``reduction="mean"``, "ZeroTensors are immutable",
  because its tangent formula updates the target's zero tangent in place), ``F.huber_loss`` and
  ``F.soft_margin_loss`` (no forward derivative of their backward), ``F.multi_margin_loss`` (no double backward).
  Activations whose torch kernel lacks a second derivative run as exact composites of ops that have one:
  ``F.hardsigmoid`` (``nn.Hardsigmoid``: MobileNetV3's squeeze-excitation gates; torch has no derivative of
  ``hardsigmoid_backward``) as ``relu6(x + 3) / 6``, the same formula as torch's kernel (bit-identical in float32
  and float64, the same first-derivative mask at the kinks), and ``F.rrelu`` in eval mode (no forward-mode or
  vmap rule) as the ``leaky_relu`` with slope ``(lower + upper) / 2`` it computes. A sweep over ``torch.nn``'s
  activations, Hugging Face's ``ACT2FN`` and timm's activation layers (tests/hessian/test_semantics_traps.py)
  checks every engine against the exact Hessian; ``rrelu`` in train mode (random slopes) keeps torch's kernel,
  which has a double backward (forward-over-reverse falls back to it, with a warning).
* :class:`FixedRNG`: the state of torch's default generators (CPU, and the CUDA device of the parameters) at
  the first forward of a batch, replayed before every later forward of that batch. Dropout (torch's and
  regops' own, which seeds from the same generators) then draws the same mask for every probe, every engine
  and both sides of a finite difference: the estimate is the Hessian of the loss at that one mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """A context in which a forward can be differentiated twice, in reverse and forward-over-reverse mode:
    ``scaled_dot_product_attention`` runs its math backend (the fused kernels have no double backward),
    ``F.mse_loss``, ``F.huber_loss``, ``F.soft_margin_loss`` and ``F.multi_margin_loss`` (and their modules) are
    computed from elementwise ops, and so are ``F.hardsigmoid`` (``nn.Hardsigmoid``) and eval-mode ``F.rrelu``.
    The Hessian estimators enter it themselves; use it around the forward whose loss you pass to
    `regops.hessian.trace_penalty` (or any ``create_graph`` backward) in an attention model.

    Takes no arguments.

    Returns:
        A context manager; the patched functions are restored when the block exits.

    Example::

        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        >>> x, targets = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
        >>> with regops.hessian.twice_differentiable():  # attention on its math backend: a double backward
        ...     loss = torch.nn.functional.mse_loss(layer(x), targets)
        ...     penalty = regops.hessian.trace_penalty(loss, layer)
        >>> (loss + 1e-3 * penalty).backward()
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), _TwiceDifferentiableLosses():
        yield


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"{reduction} is not a valid value for reduction")


def _mse(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    if weight is not None:  # torch's weighted path is already elementwise ops
        return F.mse_loss(input, target, size_average, reduce, reduction, weight)
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    x, t = torch.broadcast_tensors(input, target)
    d = x - t
    return _reduce(d * d, reduction)


def _legacy(size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        return torch.nn._reduction.legacy_get_string(size_average, reduce)
    return reduction


def _soft_margin(input, target, size_average=None, reduce=None, reduction="mean"):
    return _reduce(F.softplus(-target * input), _legacy(size_average, reduce, reduction))


def _multi_margin(input, target, p=1, margin=1.0, weight=None, size_average=None, reduce=None, reduction="mean"):
    if p not in (1, 2):
        return F.multi_margin_loss(input, target, p, margin, weight, size_average, reduce, reduction)
    x = input if input.dim() == 2 else input.reshape(1, -1)
    t = target.reshape(-1, 1)
    z = (margin - x.gather(1, t) + x).clamp_min(0.0)
    if p == 2:
        z = z * z
    if weight is not None:  # w[y] max(0, margin - x[y] + x[i])^p, as torch's kernel computes it
        z = z * weight[t]
    per_example = z.scatter(1, t, 0.0).sum(1).reshape(target.shape) / x.shape[1]
    return _reduce(per_example, _legacy(size_average, reduce, reduction))


def _huber(input, target, reduction="mean", delta=1.0, weight=None):
    if weight is not None:
        return F.huber_loss(input, target, reduction, delta, weight)
    x, t = torch.broadcast_tensors(input, target)
    d = x - t
    a = d.abs()
    return _reduce(torch.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta)), reduction)


def _hardsigmoid_of(x: torch.Tensor) -> torch.Tensor:
    """``min(max(x + 3, 0), 6) / 6`` as torch's kernel computes it (16-bit inputs in float32, rounded once), from
    ``relu6`` (``hardtanh``), whose backward has a derivative in both modes and the same strict mask at -3 and 3."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    out = F.relu6((x.float() if low else x) + 3.0) / 6.0
    return out.to(x.dtype) if low else out


def _hardsigmoid(input, inplace=False):
    out = _hardsigmoid_of(input)
    return input.copy_(out) if inplace else out


def _hardsigmoid_(input):
    return input.copy_(_hardsigmoid_of(input))


def _rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    if training:  # random slopes: torch's kernel (it has a double backward)
        return F.rrelu(input, lower, upper, training, inplace)
    return F.leaky_relu(input, (lower + upper) / 2, inplace)


def _torch_rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, generator=None):
    if training:
        return torch.rrelu(input, lower, upper, training, generator)
    return F.leaky_relu(input, (lower + upper) / 2)


def _torch_rrelu_(input, lower=1.0 / 8, upper=1.0 / 3, training=False, generator=None):
    if training:
        return torch.rrelu_(input, lower, upper, training, generator)
    return F.leaky_relu(input, (lower + upper) / 2, inplace=True)


class _TwiceDifferentiableLosses(TorchFunctionMode):
    """Routes the losses and activations above to their elementwise forms; every other call passes through."""

    _REWRITES = {
        F.mse_loss: _mse,
        F.huber_loss: _huber,
        F.soft_margin_loss: _soft_margin,
        F.multi_margin_loss: _multi_margin,
        F.hardsigmoid: _hardsigmoid,
        torch._C._nn.hardsigmoid: _hardsigmoid,
        torch._C._nn.hardsigmoid_: _hardsigmoid_,
        F.rrelu: _rrelu,
        torch.rrelu: _torch_rrelu,
        torch.rrelu_: _torch_rrelu_,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rewrite = self._REWRITES.get(func)
        return (rewrite or func)(*args, **(kwargs or {}))


class FixedRNG:
    """Replays torch's default-generator state of a batch's first forward before each later forward.

    The first forward runs as usual (drawing from, and advancing, the generators as a plain forward would);
    its starting state is kept, and every later forward runs under ``torch.random.fork_rng`` restored to it,
    so it draws the same dropout masks and leaves the caller's generators untouched.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _cuda_index(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        idx = self._cuda_index()
        if self.state is None:
            self.state = (torch.get_rng_state(), torch.cuda.get_rng_state(idx) if idx is not None else None)
            yield
            return
        with torch.random.fork_rng(devices=[idx] if idx is not None else [], device_type="cuda"):
            torch.set_rng_state(self.state[0])
            if idx is not None:
                torch.cuda.set_rng_state(self.state[1], idx)
            yield
