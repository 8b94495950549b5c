"""Declaring an op: one call registers the ``regops::<name>`` operator, its fake, its backends and its autograd.

::

    dropout = declare(
        "dropout(Tensor x, Tensor p, Tensor seed) -> Tensor",
        reference=reference.dropout,                 # pure PyTorch, any device; the op's exact signature
        triton="regops.dropout.triton:dropout",      # imported on first use
        fake=like_input,
    )
    dropout.register_autograd(backward, setup_context=setup_context)
    y = dropout(x, p, seed)                          # the op: eager, autograd, torch.compile

The schema is the only signature: the reference, the Triton launcher, the C++ CPU kernel and the CUDA kernel all
take the op's arguments and return its results (seeds and runtime scalars such as ``p`` are tensors). The C++
kernels register themselves on the same operator from csrc/ (``TORCH_LIBRARY_IMPL(regops, CPU | CUDA)``); the
Python implementation, registered as ``CompositeExplicitAutograd``, runs what :mod:`regops._core.dispatch` chooses
wherever no C++ kernel is registered.

Calling an :class:`Op` is cheap in eager mode: without gradients it goes straight to the dispatcher below the
autograd layer; with gradients it runs one ``torch.autograd.Function`` built from the op's backward formula (the
same formula is registered on the operator for ``torch.compile``, ``opcheck`` and direct calls).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from regops._core import dispatch

LIB = torch.library.Library("regops", "FRAGMENT")
_is_compiling = torch.compiler.is_compiling
_any_requires_grad = torch._C._any_requires_grad
_BelowAutograd = torch._C._AutoDispatchBelowAutograd
_BelowInplaceOrView = torch._C._AutoDispatchBelowADInplaceOrView
_functorch_active = torch._C._are_functorch_transforms_active


class Op:
    """A declared ``regops::<name>`` operator (see :func:`declare`)."""

    def __init__(
        self,
        schema: str,
        *,
        reference: Callable[..., Any],
        fake: Callable[..., Any],
        triton: Callable[..., Any] | str | None = None,
        triton_dtypes: tuple[torch.dtype, ...] | None = None,
        gpu_reference: bool = False,
        composite: bool = False,
        contiguous: bool = True,
        layout_of_first: bool = False,
        tags: tuple[torch.Tag, ...] = (),
    ) -> None:
        self.name = schema[: schema.index("(")].strip()
        self.qualname = f"regops::{self.name}"
        self.reference = reference
        self.triton = triton
        self.triton_dtypes = triton_dtypes
        self.gpu_reference = gpu_reference
        self.composite = composite
        self.contiguous = contiguous
        self.layout_of_first = layout_of_first
        LIB.define(schema, tags=tags)
        self.overload = getattr(torch.ops.regops, self.name).default
        arguments = self.overload._schema.arguments
        self._tensor_args = [i for i, a in enumerate(arguments) if "Tensor" in str(a.type) and not a.kwarg_only]
        # autograd.Function sees only top-level tensors: an op with a Tensor[] argument always goes through the
        # operator, whose registered autograd takes the lists apart.
        self._via_operator = any(str(a.type).startswith("List[Tensor]") for a in arguments)
        # In-place ops (``Tensor(a!)`` / ``Tensor(a!)[]`` arguments) write their inputs: a contiguous copy would
        # take the writes, and autograd must see the writes (version counters), as for torch's in-place ops.
        self.mutated = [i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write]
        if self.mutated and contiguous:
            raise ValueError(f"regops: {self.qualname} writes its inputs in place: declare it with contiguous=False")
        LIB.impl(self.name, self.run, "CompositeExplicitAutograd")
        if self.mutated:
            LIB.impl(self.name, self._bump_versions, "ADInplaceOrView")
        torch.library.register_fake(self.qualname, self._laid_out(fake) if layout_of_first else fake, lib=LIB)
        self._function: type[torch.autograd.Function] | None = None
        dispatch.add(self)

    def __repr__(self) -> str:
        return f"<regops op {self.qualname}>"

    def __call__(self, *args: Any) -> Any:
        if _is_compiling() or _functorch_active() or self._via_operator:  # the operator's autograd serves these
            return self.overload(*args)
        if self._function is not None and torch.is_grad_enabled() and _any_requires_grad(*args):
            if dispatch.native_autograd(self):  # the extension's C++ derivative: no Python on the way
                return self.overload(*args)
            return self._function.apply(*args)
        with _BelowAutograd():
            return self.overload(*args)

    def autograd_kernel(self, *args: Any) -> Any:
        """The Python derivative as the operator's ``Autograd`` kernel (what a forced Python backend runs)."""
        if torch.is_grad_enabled() and _any_requires_grad(*args):
            return self._function.apply(*args)
        with _BelowAutograd():
            return self.overload(*args)

    def _bump_versions(self, *args: Any) -> Any:
        """In-place ops: run the op below this key, then bump the version counters of the tensors it wrote, so that
        autograd rejects a backward through values the op overwrote (torch's in-place ops do the same)."""
        with _BelowInplaceOrView():
            out = self.overload(*args)
        written: list[torch.Tensor] = []
        for i in self.mutated:
            a = args[i] if i < len(args) else None
            if isinstance(a, torch.Tensor):
                written.append(a)
            elif a:  # a Tensor(a!)[] list: tensors only, by the schema
                written.extend(a)
        torch._C._increment_version(written)
        return out

    def run(self, *args: Any) -> Any:
        """The Python implementation: the backend :func:`regops._core.dispatch.choose` picks for the inputs."""
        first = self._first_tensor(args)
        backend = dispatch.choose(self.name, first.device, self._floating_dtype(args))
        if backend in dispatch.NATIVE_KEYS:
            # The extension was loaded by this very call: its kernel now holds the dispatch key.
            if not dispatch.native_registered(self.name, backend):
                raise RuntimeError(f"regops: {self.qualname} has no {backend} kernel registered")
            with _BelowAutograd():
                return self.overload(*args)
        impl = dispatch.python_implementation(self.name, backend)
        if self.contiguous:
            impl = _on_contiguous(impl)
        return self._laid_out(impl)(*args) if self.layout_of_first else impl(*args)

    def _laid_out(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its first output (contiguous) returned in the memory format of the op's first tensor."""

        def laid_out(*args: Any) -> Any:
            out, first = fn(*args), self._first_tensor(args)
            if isinstance(out, tuple):
                return (in_layout_of(first, out[0]), *out[1:])
            return in_layout_of(first, out)

        return laid_out

    def _first_tensor(self, args: tuple[Any, ...]) -> torch.Tensor:
        for i in self._tensor_args:
            a = args[i] if i < len(args) else None
            if isinstance(a, (list, tuple)):
                a = next((t for t in a if isinstance(t, torch.Tensor)), None)
            if isinstance(a, torch.Tensor):
                return a
        raise ValueError(f"regops: {self.qualname} was called without a tensor argument")

    def _floating_dtype(self, args: tuple[Any, ...]) -> torch.dtype | None:
        """The dtype of the first floating-point tensor argument (integer ids before the values they index do not
        decide which kernels can take the op's data)."""
        for i in self._tensor_args:
            a = args[i] if i < len(args) else None
            if isinstance(a, (list, tuple)):
                a = next((t for t in a if isinstance(t, torch.Tensor)), None)
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                return a.dtype
        return None

    def register_autograd(
        self, backward: Callable[..., Any], *, setup_context: Callable[..., None] | None = None
    ) -> None:
        """The op's derivative: ``setup_context(ctx, inputs, output)`` saves what ``backward(ctx, *grads)`` needs;
        ``backward`` returns one gradient (or ``None``) per input. Registered on the operator and used by calls."""
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=LIB)
        overload = self.overload
        setup = setup_context or (lambda ctx, inputs, output: None)

        # ``forward(ctx, *args)`` rather than a separate ``setup_context`` staticmethod: with one, every apply
        # binds the arguments to forward's signature through ``inspect`` (tens of microseconds a call).
        def forward(ctx: Any, *args: Any) -> Any:
            with _BelowAutograd():
                output = overload(*args)
            setup(ctx, args, output)
            return output

        members = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
        self._function = type(f"{self.name}_autograd", (torch.autograd.Function,), members)


def _contiguous(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a.contiguous()
    if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
        return type(a)(t.contiguous() for t in a)
    return a


def _on_contiguous(fn: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args: fn(*(_contiguous(a) for a in args))


def declare(schema: str, **kwargs: Any) -> Op:
    """Declare op ``regops::<name>`` from its schema.

    Args:
        schema: the ``torch.library`` schema, e.g. ``"dropout(Tensor x, Tensor p, Tensor seed) -> Tensor"``.
        reference: the pure-PyTorch implementation (any device), taking the op's arguments.
        fake: shapes, dtypes and strides of the outputs from the inputs (``torch.compile``, meta tensors).
        triton: the Triton launcher, or ``"module:function"`` imported on first use.
        triton_dtypes: the input dtypes the Triton kernel takes (default: all); other dtypes run the reference.
        gpu_reference: the reference is this op's GPU implementation where no kernel exists.
        composite: the reference is built from other regops ops (which dispatch themselves): it runs everywhere.
        contiguous: the Python backends receive contiguous tensors (default). In-place ops (a ``Tensor(a!)`` or
            ``Tensor(a!)[]`` argument in the schema) must say ``contiguous=False``: their backends write the
            tensors they are given. Their fake returns nothing, and every call bumps the version counters of the
            tensors it writes, as torch's in-place ops do.
        layout_of_first: the first output (computed contiguous) is returned in the memory format of the first
            tensor argument, as torch's elementwise ops do (channels_last in, channels_last out); the C++ kernels
            do the same.
        tags: ``torch.Tag`` values of the operator.
    """
    return Op(schema, **kwargs)


def like_first(x: torch.Tensor, *args: Any) -> torch.Tensor:
    """Fake of an op whose output has its first input's shape and dtype (contiguous; see ``layout_of_first``)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def in_layout_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (contiguous, x's shape) laid out like ``x``: channels_last in, channels_last out, as torch does.

    Kernels run on contiguous data (masks follow the logical, row-major index whatever the layout), so a dense
    non-contiguous ``x`` costs one extra copy. Fakes call this too, so strides always agree with the kernels.
    """
    if x.is_contiguous():
        return y
    out = torch.empty_like(x, dtype=y.dtype)
    return y if out.stride() == y.stride() else out.copy_(y)
