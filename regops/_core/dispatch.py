"""The one place that decides which implementation runs an op.

Backends of an op, all with the op's own signature (its ``torch.library`` schema):

* ``"torch"``  -- the pure-PyTorch reference (any device);
* ``"triton"`` -- a Triton launcher (CUDA tensors, or CPU tensors under the interpreter: ``TRITON_INTERPRET=1``);
* ``"cpp"``    -- the C++ CPU kernel of ``regops._C``, registered on the op for the ``CPU`` dispatch key;
* ``"cuda"``   -- the CUDA kernel of ``regops._C``, registered on the op for the ``CUDA`` dispatch key.

The C++ kernels are reached by the dispatcher with no Python in between; every other choice is made here, by the
op's Python implementation (``CompositeExplicitAutograd``). Selection, in order: a backend forced by
:func:`use_backend`, then ``REGOPS_BACKEND``, then automatic: CPU tensors run the C++ kernel where the extension
has one, else the reference; CUDA tensors the CUDA kernel, else Triton, else (for an op declared so, or a dtype
its Triton kernel does not take) the reference; a CUDA tensor that nothing can run gets one
:class:`BackendUnavailableError` that names what is missing.

A forced ``torch`` or ``triton`` backend must bypass C++ kernels already registered, and a forced ``cpp`` or
``cuda`` backend the other device's (whose tensors it cannot run: they get the error that says so):
:func:`use_backend` (and ``REGOPS_BACKEND``, read when the extension loads) registers the Python implementation
over them for the duration (process-wide), and removes it after. Nothing here imports Triton or touches CUDA
until an op runs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from regops._core import extension

BACKENDS = ("torch", "triton", "cuda", "cpp")
NATIVE_KEYS = {"cpp": "CPU", "cuda": "CUDA"}


class BackendUnavailableError(RuntimeError):
    """The requested (or only possible) implementation of an op cannot run here.

    Args:
        *args: the message (which op, which backend, and why), as any exception.

    Example::

        >>> try:
        ...     with regops.use_backend("cuda"):  # a CPU tensor under a forced CUDA backend
        ...         regops.dropout(torch.ones(4), 0.5)
        ... except regops.BackendUnavailableError as e:
        ...     print("unavailable")
        unavailable
    """


class Declared(Protocol):
    """What dispatch needs to know of a declared op (see :class:`regops._core.ops.Op`)."""

    name: str
    qualname: str
    triton: Callable[..., Any] | str | None
    triton_dtypes: tuple[torch.dtype, ...] | None
    gpu_reference: bool
    composite: bool

    def reference(self, *args: Any) -> Any: ...

    def run(self, *args: Any) -> Any: ...

    def autograd_kernel(self, *args: Any) -> Any: ...


_OPS: dict[str, Declared] = {}
_forced: list[str | None] = []  # the use_backend stack (process-wide: it changes the dispatcher's registrations)
_shadow: list[Any] = []  # the torch.library.Library holding the current forced-backend registrations, if any
_shadowed: set[str] = set()  # the dispatch keys ("CPU", "CUDA", "Autograd") whose C++ kernels it bypasses
_native: dict[tuple[str, str], bool] = {}  # (op, dispatch key) -> a C++ kernel is registered (with no shadow)
_autograd_route: dict[str, bool] = {}  # op -> native_autograd(op), cleared whenever the registrations change


def add(op: Declared) -> None:
    if op.name in _OPS:
        raise RuntimeError(f"regops: op {op.name!r} is declared twice")
    _OPS[op.name] = op


def declared(name: str) -> Declared:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"regops: unknown op {name!r}") from None


def registered_ops() -> list[str]:
    return sorted(_OPS)


# ----------------------------------------------------------------------------------------------- forcing
def requested_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``REGOPS_BACKEND``, or ``None`` for automatic."""
    if _forced and _forced[-1] is not None:
        return _forced[-1]
    env = os.environ.get("REGOPS_BACKEND", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"regops: REGOPS_BACKEND={env!r} is not one of {BACKENDS} or 'auto'")
    return env


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend (``"torch"``, ``"triton"``, ``"cuda"``, ``"cpp"``) for every op inside the block; ``None``
    lifts an outer block's choice (``REGOPS_BACKEND`` applies again, else automatic). Process-wide (it changes the
    dispatcher's registrations), so use it from one thread.

    Args:
        name: ``"torch"`` (the reference), ``"triton"``, ``"cuda"``, ``"cpp"``, or ``None``.

    Returns:
        A context manager; the previous choice is restored when the block exits.

    Example::

        >>> with regops.use_backend("torch"):
        ...     y = regops.dropout(torch.ones(4), 0.5)   # the reference, even where a C++ kernel exists
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"regops: unknown backend {name!r}; choose one of {BACKENDS} or None")
    _forced.append(name)
    _reshadow()
    try:
        yield
    finally:
        _forced.pop()
        _reshadow()


def _reshadow() -> None:
    """Register the Python implementation over the C++ kernels that the forced backend is not: all of them for a
    Python backend; the other device's for a native one, so that its tensors reach :func:`choose`, which says why
    the forced backend cannot run them."""
    while _shadow:
        _shadow.pop()._destroy()
    _shadowed.clear()
    _autograd_route.clear()
    forced = requested_backend()
    if forced is None:
        return
    extension.load()  # the C++ kernels an op would otherwise load on its first call
    keys = {key for backend, key in NATIVE_KEYS.items() if backend != forced}
    python = forced in ("torch", "triton")
    lib = None
    for op in _OPS.values():
        for key in NATIVE_KEYS.values():
            if _has_native(op, key) and key in keys:
                lib = lib or torch.library.Library("regops", "IMPL")
                lib.impl(op.name, op.run, key)
        if _native_autograd(op) and python:  # the Python formula, which the forced backends are tested with
            lib = lib or torch.library.Library("regops", "IMPL")
            lib.impl(op.name, op.autograd_kernel, "Autograd")
    if lib is not None:
        _shadow.append(lib)
        _shadowed.update(keys | ({"Autograd"} if python else set()))
        _autograd_route.clear()


def _has_native(op: Declared, key: str) -> bool:
    """Whether the loaded extension registers a C++ kernel for ``op`` and dispatch ``key`` (looked up once)."""
    if not extension.loaded():
        return False
    found = _native.get((op.name, key))
    if found is None:
        assert not _shadow, "C++ kernels are looked up before any forced registration"
        found = _native[(op.name, key)] = torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname, key)
    return found


def _native_autograd(op: Declared) -> bool:
    """Whether the extension registers the op's derivative in C++ (looked up once): the dispatcher lists each
    kernel with how it can be called, and a C++ kernel is the only kind callable unboxed."""
    if not extension.loaded():
        return False
    found = _native.get((op.name, "Autograd"))
    if found is None:
        lines = torch._C._dispatch_dump(op.qualname).splitlines()
        found = any(line.startswith("Autograd") and "unboxed" in line for line in lines)
        _native[(op.name, "Autograd")] = found
    return found


def native_autograd(op: Declared) -> bool:
    """Whether calls of ``op`` with gradients should go through the dispatcher to a C++ derivative (decided once
    per op while the loaded extension and the forced backend stay as they are: every call with gradients asks)."""
    route = _autograd_route.get(op.name)
    if route is None:
        route = "Autograd" not in _shadowed and _native_autograd(op)
        if extension.loaded():
            _autograd_route[op.name] = route
    return route


def _on_extension_loaded() -> None:
    if requested_backend() is not None and not _shadow:
        _reshadow()


# ----------------------------------------------------------------------------------------------- choice
def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def why_not(name: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """``None`` if ``backend`` can run op ``name`` on ``device`` (for inputs of ``dtype``), else the reason."""
    op = declared(name)
    if op.composite and backend in ("torch", "triton"):
        return None  # built from other regops ops: each of those dispatches itself
    if backend == "torch":
        return None
    if backend == "triton":
        if op.triton is None:
            return f"no Triton kernel for {name!r}"
        if not triton_importable():
            return "Triton is not installed (it ships with torch's CUDA wheels; `pip install triton`)"
        if device.type == "cpu" and not triton_interpreted():
            return "Triton kernels run on CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device.type} tensors"
        if dtype is not None and op.triton_dtypes is not None and dtype not in op.triton_dtypes:
            return f"the Triton kernel of {name!r} does not take {dtype}"
        return None
    if backend not in NATIVE_KEYS:
        raise ValueError(f"regops: unknown backend {backend!r}; choose one of {BACKENDS}")
    wanted = "cpu" if backend == "cpp" else "cuda"
    if device.type != wanted:
        return f"the {'C++ CPU' if backend == 'cpp' else 'CUDA'} kernels run on {wanted} tensors, not {device.type}"
    if extension.load() is None:
        _on_extension_loaded()
        return f"the extension regops._C is unavailable: {extension.status()}"
    _on_extension_loaded()
    if not _has_native(op, NATIVE_KEYS[backend]):
        what = "C++ CPU" if backend == "cpp" else "CUDA"
        return f"regops._C has no {what} kernel for {name!r}"
    return None


def choose(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs op ``name`` for tensors on ``device`` (raises if the forced one cannot)."""
    forced = requested_backend()
    if declared(name).composite:  # its own C++ kernel where the extension has one, else the composition
        native = {"cpu": "cpp", "cuda": "cuda"}.get(device.type)
        if native is not None and forced in (None, native) and why_not(name, native, device, dtype) is None:
            return native
        return "torch"
    if forced is not None:
        reason = why_not(name, forced, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"regops: backend {forced!r} cannot run {name!r} on {device}: {reason}")
        return forced
    if device.type == "cpu":
        return "cpp" if why_not(name, "cpp", device, dtype) is None else "torch"
    if device.type != "cuda":
        return "torch"
    reasons = []
    for candidate in ("cuda", "triton"):
        reason = why_not(name, candidate, device, dtype)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    op = declared(name)
    if op.gpu_reference or (op.triton is not None and dtype is not None and dtype not in (op.triton_dtypes or ())):
        return "torch"
    raise BackendUnavailableError(
        f"regops: no GPU kernel can run {name!r} on {device} ({'; '.join(reasons)}). "
        "Install Triton or build regops._C, or use REGOPS_BACKEND=torch to run the reference on the GPU."
    )


def availability(name: str, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run op ``name`` on ``device`` or the reason it cannot."""
    return {b: why_not(name, b, device, dtype) for b in BACKENDS}


def python_implementation(name: str, backend: str) -> Callable[..., Any]:
    """The Python callable of ``backend`` (``"torch"`` or ``"triton"``) for op ``name``."""
    op = declared(name)
    if backend == "torch" or op.composite:
        return op.reference
    target = op.triton
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def native_registered(name: str, backend: str) -> bool:
    """Whether the C++ kernel of ``backend`` (``"cpp"``/``"cuda"``) is what the dispatcher runs for op ``name``."""
    return NATIVE_KEYS[backend] not in _shadowed and _has_native(declared(name), NATIVE_KEYS[backend])
