"""``per_sample_grad_dots``: exact pairwise per-example gradient inner products between two batches."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from regops._core.dtypes import acc_dtype
from regops.per_example import _forms
from regops.per_example._recorder import check_reduction
from regops.valuation._capture import Captured, call_model, capture
from regops.valuation._chunks import batch_size, bounds, signal_bytes, take, tensor_bytes

BLOCKS = (None, "param", "module")


def dense_of(cap: Captured, name: str) -> torch.Tensor:
    """``[B, *shape]`` per-example gradients of one parameter, summed over its uses."""
    total = None
    for t in cap.terms.get(name, []):
        if t.dense is not None:
            v = t.dense
        else:
            e = t.call.entry
            v = e.layer.per_example_grads(e.module, t.call.saved, t.call.grad)[t.local]
        v = v.to(acc_dtype(v))
        total = v if total is None else total + v
    return total


def _one_rule(cap: Captured, name: str) -> str | None:
    """The label of the one layer whose rule calls make every use of ``name`` (None: other uses too)."""
    labels = {t.call.entry.label if t.call is not None else None for t in cap.terms.get(name, [])}
    return labels.pop() if len(labels) == 1 and None not in labels else None


def pair_dots(
    cap1: Captured, cap2: Captured, emit: Callable[[str, torch.Tensor], None] | None = None
) -> dict[str, torch.Tensor]:
    """``{parameter name: [B1, B2]}`` inner products between the per-example gradients of two captured batches;
    with ``emit``, each parameter's block is handed to ``emit(name, block)`` as soon as it is complete instead
    (and ``{}`` returned), so that a caller summing them never holds more than one at a time.

    A parameter used only by calls of one layer sums the rule's ``grad_dots`` over every pair of those calls (a
    reused layer: the cross terms between calls included); any other parameter (tied across layers, read through
    slices, the torch.func path) is handled with its per-example gradients summed over its uses."""
    out: dict[str, torch.Tensor] = {}
    emit = emit or out.__setitem__
    done: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # a pair of calls' blocks, until each is used
    dtype, emitted = None, set()
    for name in cap1.terms:
        label = _one_rule(cap1, name)
        total = None
        if label is not None and label == _one_rule(cap2, name):
            for t1 in cap1.terms[name]:
                for t2 in cap2.terms.get(name, []):
                    key = (id(t1.call), id(t2.call))
                    if key not in done:
                        e, c1, c2 = t1.call.entry, t1.call, t2.call
                        form = e.form if e.form != "auto" else e.layer.dots_form(e.module, c1.saved, c2.saved)
                        done[key] = e.layer.grad_dots(e.module, c1.saved, c1.grad, c2.saved, c2.grad, form)
                    v = done[key].pop(t1.local)
                    if not done[key]:
                        del done[key]
                    total = v if total is None else total + v
        else:
            d1, d2 = dense_of(cap1, name), dense_of(cap2, name)
            if d1 is not None and d2 is not None:
                total = _forms.flat_dots(d1, d2)
        if total is not None:
            dtype = dtype or total.dtype
            emitted.add(name)
            emit(name, total)
    # Parameters the loss did not reach have zero per-example gradients.
    p0 = next(iter(cap1.params.values()))
    for name in cap1.params:
        if name not in emitted:
            emit(name, torch.zeros(cap1.batch, cap2.batch, dtype=dtype or acc_dtype(p0), device=p0.device))
    return out


def summed_dots(cap1: Captured, cap2: Captured, blocks: str | None = None):
    """The ``[B1, B2]`` inner products summed over all parameters (``blocks=None``), per module (``"module"``) or
    not at all (``"param"``). The sums are taken as the blocks come (:func:`pair_dots`' ``emit``): at most one
    parameter's block is held besides the sums."""
    if blocks == "param":
        return pair_dots(cap1, cap2)
    owner = {n: m for m, names in cap1.owners().items() for n in names} if blocks == "module" else {}
    sums: dict[str | None, torch.Tensor] = {}

    def add(name: str, block: torch.Tensor) -> None:
        key = owner.get(name)
        sums[key] = block if key not in sums else sums[key] + block

    pair_dots(cap1, cap2, add)
    if blocks == "module":
        return {m: sums[m] for m in cap1.owners()}
    return sums[None]


def per_sample_grad_dots(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    *,
    loss_reduction: str | None = None,
    blocks: str | None = None,
    forms: str | Mapping[str, str] | None = None,
    unsupported: str = "error",
    chunk: int | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    r"""Exact inner products between the per-example gradients of a training batch and of a test batch.

    .. math:: D_{ij} = \big\langle \nabla_\theta \ell(z_i),\, \nabla_\theta \ell(z'_j) \big\rangle
              = \sum_k \big\langle \nabla_{\theta_k} \ell(z_i),\, \nabla_{\theta_k} \ell(z'_j) \big\rangle

    over the trainable parameters of the tracked layers, from one forward and one backward per batch, without
    building the ``B x P`` per-example gradients where a cheaper exact form exists. Per layer (chosen by cost
    as the per-example norms do, or by ``forms``): a Linear on ``[B, d]`` inputs uses
    ``(a_i\cdot a'_j)(g_i\cdot g'_j)``; on sequences the cross Gram (ghost) form
    ``\sum_{t,s}(a_{it}\cdot a'_{js})(g_{it}\cdot g'_{js})`` (a tiled Triton kernel on GPU, no
    ``T x T'`` matrix in memory) or the instantiated gradients; Conv the same on unfolded patches; Embedding
    the id-equality Gram; norms and biases their small per-example gradients. ``p.grad`` is not touched.

    Args:
        model: as for `regops.per_sample_grad_norms` (Linear, Conv1d/2d/3d, Embedding, LayerNorm,
            GroupNorm, RMSNorm, registered rules, shared modules; ``unsupported="vmap"`` for other modules).
            Examples must be independent (no BatchNorm in train mode).
        loss_fn: ``loss_fn(model_outputs, targets) -> scalar`` batch loss.
        train: ``(inputs, targets)`` with ``B`` examples (``inputs`` a tensor, a tuple of positional
            arguments or a dict of keyword arguments); test: ``(inputs, targets)`` with ``B2`` examples.
        loss_reduction: required, as for `regops.per_sample_grad_norms`: ``"sum"`` (the loss is
            ``\sum_i \ell_i``) or ``"mean"`` (``\frac1B\sum_i\ell_i``: ``F.cross_entropy``'s default);
            either way ``D`` is between the gradients of the per-example losses ``\ell_i``. A wrong value
            would scale every entry by ``B``: where the loss can be evaluated on parts of the batch (tensor
            outputs and targets), a value that contradicts the loss raises.
        blocks: ``None`` for the ``[B, B2]`` total, ``"param"`` for ``{parameter name: [B, B2]}``, ``"module"``
            for ``{module name: [B, B2]}``.
        forms: ``"auto"``, ``"ghost"``, ``"instantiate"`` or ``{module name: form}``.
        unsupported: ``"error"`` or ``"vmap"`` (as for the norms).
        chunk: examples per chunk of both batches. ``None`` (default) chooses it so that the signals held at
            once stay within what a plain forward and backward of the training batch holds (its parameters'
            gradients and layer inputs, measured on two examples): each test chunk is captured once and the
            training batch streamed past it chunk by chunk (one more forward and backward of the training batch
            per extra test chunk); both batches are taken whole when they fit. Chunks need batches whose tensors
            all have the examples along dim 0 and a loss that is the sum or mean of per-example losses (checked
            on its halves); otherwise the batches are taken whole. The result is the same up to the order of
            floating-point sums.

    Returns:
        ``[B, B2]`` float32 (float64 for a float64 model), or a dict of them (``blocks``). With
        ``test is train`` the diagonal is ``per_sample_grad_norms(...).total ** 2``.

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> x_train, y_train = torch.randn(16, 20), torch.randint(0, 5, (16,))
        >>> x_test, y_test = torch.randn(4, 20), torch.arange(4)
        >>> d = regops.per_sample_grad_dots(model, F.cross_entropy, (x_train, y_train), (x_test, y_test),
        ...                                 loss_reduction="mean")
        >>> d.shape  # [B_train, B_test]
        torch.Size([16, 4])
        >>> best = d.argmax(0)  # the most aligned training example of each test example
    """
    check_reduction(loss_reduction)
    if blocks not in BLOCKS:
        raise ValueError(f"regops: blocks must be None, 'param' or 'module', got {blocks!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"regops: chunk must be a positive int or None, got {chunk!r}")
    kw = dict(loss_reduction=loss_reduction, forms=forms, unsupported=unsupported)
    n1, n2 = batch_size(train), batch_size(test)
    if n1 is not None and n2 is not None:
        if chunk is None or chunk < max(n1, n2):
            chunk = chunk_size(model, loss_fn, train, (n1, n2), chunk, kw)
        if chunk is not None and chunk < max(n1, n2):
            return _streamed(model, loss_fn, train, test, (n1, n2), chunk, blocks, kw)
    elif chunk is not None:
        raise ValueError("regops: chunk= needs batches whose tensors all have the examples along dim 0")
    cap1 = capture(model, loss_fn, train, **kw)
    cap2 = cap1 if test is train else capture(model, loss_fn, test, **kw)
    return summed_dots(cap1, cap2, blocks)


def _streamed(model, loss_fn, train, test, sizes: tuple[int, int], chunk: int, blocks: str | None, kw: dict):
    """:func:`summed_dots` of the two batches taken ``chunk`` examples at a time: each test chunk captured once,
    the training chunks captured in turn against it, every capture released before the next."""
    rows, cols = bounds(sizes[0], chunk), bounds(sizes[1], chunk)
    same = test is train
    out: dict[str | None, torch.Tensor] = {}
    for j0, j1 in cols:
        cap2 = capture(model, loss_fn, take(test, j0, j1), **kw)
        for i0, i1 in rows:
            cap1 = cap2 if same and (i0, i1) == (j0, j1) else capture(model, loss_fn, take(train, i0, i1), **kw)
            part = summed_dots(cap1, cap2, blocks)
            del cap1
            for key, block in part.items() if isinstance(part, dict) else [(None, part)]:
                if key not in out:
                    out[key] = block.new_empty(sizes)
                out[key][i0:i1, j0:j1] = block
            del part, block
        del cap2
    return out if blocks is not None else out[None]


# ------------------------------------------------------------------------------------------ chunk size
def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _saved_bytes(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], batch: Any) -> int:
    """The bytes a plain forward of ``batch`` saves for its backward, the parameters left out."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: set[tuple[int, torch.device, tuple[int, ...]]] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if t.data_ptr() not in params:
            saved += tensor_bytes(t, seen)
        return t

    inputs, targets = batch
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(call_model(model, inputs), targets)
    return saved


class _Peak(TorchFunctionMode):
    """The peak bytes of the storages that the ops under it allocate, live while a tensor on them is referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}  # storage -> live tensors on it
        self.live = self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key not in self.refs:
                if t._base is not None or not nbytes:  # a view of a tensor made before the mode
                    continue
                self.refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key, nbytes)
        return out


def _peak(cap1: Captured, cap2: Captured) -> int:
    with _Peak() as seen:
        summed_dots(cap1, cap2)
    return seen.peak


def chunk_size(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    train: Any,
    sizes: tuple[int, int],
    chunk: int | None,
    kw: dict,
) -> int | None:
    """The number of examples per chunk of both batches, or None to take each batch whole.

    A probe of two training examples gives per example: the signals a capture holds (``s`` bytes: layer inputs
    and output gradients, or per-example gradients), the layer inputs among them (``a``) and what the forward's
    autograd graph saves (``g``, the layer inputs included). A plain forward and backward of the training batch
    holds its parameters' gradients and the saved tensors: ``M = bytes(params) + n_train * g``. Streaming holds a
    test chunk's signals while a training chunk is captured, whose graph and signals share the layer inputs,
    ``c * s + c * (s + g - a)``, and then the two chunks' dots, whose forms may make tensors growing with the
    number of pairs (the Embedding's and the ghost forms' token Grams): ``q`` bytes per pair, from the peak bytes
    the dots of the probe and of its first example hold (``A(b1, b2)`` for b1 x b2 examples, their per-example
    parts cancel): ``q = A(2, 2) - A(1, 2) - A(2, 1) + A(1, 1)``. ``c`` is the largest with
    ``c (2 s + g - a) + c^2 q <= M``; the batches are taken whole where that holds for both batches whole, or
    where their estimate is within the scratch the dots forms allow themselves (``_forms._CHUNK_BYTES``: chunks
    would cost forwards to save less than that). Chunks need a loss whose per-example losses do not depend on
    the examples beside them (checked on the probe: the batch loss is the declared reduction of its halves)."""
    n_train, n_test = sizes
    if n_train < 2:
        return chunk
    # The probes leave the random state as they found it: a model drawing random numbers (dropout) gives what it
    # gave without them.
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        probe = capture(model, loss_fn, take(train, 0, 2), **kw)
    if not probe.splits:
        if chunk is not None:
            raise ValueError(
                "regops: chunk= needs a loss whose value on a batch is the declared reduction (loss_reduction) of "
                "its values on parts of the batch, so that each example's loss does not depend on its neighbours"
            )
        return None
    if chunk is not None:
        return chunk
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        one = capture(model, loss_fn, take(train, 0, 1), **kw)
        g = _saved_bytes(model, loss_fn, take(train, 0, 2))
    q = max(0, _peak(probe, probe) - _peak(one, probe) - _peak(probe, one) + _peak(one, one))
    s, a = signal_bytes(probe)
    params = sum(p.numel() * p.element_size() for p in probe.params.values())
    b = probe.batch
    del probe, one
    budget, linear = params + n_train * g / b, (2 * s + g - a) / b
    if max(n_train, n_test) * linear + n_train * n_test * q <= max(budget, _forms._CHUNK_BYTES):
        return None  # both batches whole within budget, or within the scratch the dots forms allow themselves
    c = budget / linear if q == 0 else (math.sqrt(linear**2 + 4 * q * budget) - linear) / (2 * q)
    return max(1, int(c))
