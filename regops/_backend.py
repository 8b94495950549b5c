"""The one place that decides which implementation runs an op.

Every kernel-backed op registers its implementations here under one name, all with the same signature:

* ``"torch"``  -- the pure-PyTorch reference in :mod:`regops.reference` (any device),
* ``"triton"`` -- a Triton launcher in :mod:`regops.kernels` (CUDA tensors, or CPU tensors when the
  Triton interpreter is on: ``TRITON_INTERPRET=1``),
* ``"cuda"``   -- the CUDA C++ extension ``regops._C`` (CUDA tensors), op ``torch.ops.regops_C.<name>``,
* ``"cpp"``    -- the C++ CPU kernels of ``regops._C`` (CPU tensors), op ``torch.ops.regops_cpu.<name>``: used for
  every op whose name the extension registers a CPU kernel for; it has the signature of the op's reference, so
  registering an op needs nothing more for it.

Selection, in order: the innermost :func:`use_backend` context, then ``REGOPS_BACKEND``, then automatic
(CPU tensors: ``cpp`` if the extension has a CPU kernel for the op, else ``torch``; CUDA tensors: ``cuda`` if the
extension has the op, else ``triton``).
A CUDA tensor with no GPU kernel available raises one :class:`BackendUnavailableError` naming what is missing.
Nothing here imports Triton, loads the extension or touches CUDA until an op actually runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

BACKENDS = ("torch", "triton", "cuda", "cpp")
CPP_NAMESPACE = "regops_cpu"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("regops_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """The requested (or only possible) implementation of an op cannot run here."""


@dataclass
class _OpImpls:
    torch: Callable[..., Any]
    # A callable, or "module:attribute" imported on first use so that importing regops never imports Triton.
    triton: Callable[..., Any] | str | None = None
    # A callable that calls torch.ops.regops_C.<op>; used only when the loaded extension defines that op.
    cuda: Callable[..., Any] | None = None
    # Fake (meta) impl of torch.ops.regops_C.<op>, registered when the extension loads.
    cuda_fake: Callable[..., Any] | None = None
    # Fake impl of the C++ CPU kernel regops_cpu::<op> when the reference cannot trace (it reads values on the host).
    cpp_fake: Callable[..., Any] | None = None
    resolved: dict[str, Callable[..., Any]] = field(default_factory=dict)


_REGISTRY: dict[str, _OpImpls] = {}


def register(
    op: str,
    *,
    torch: Callable[..., Any],
    triton: Callable[..., Any] | str | None = None,
    cuda: Callable[..., Any] | None = None,
    cuda_fake: Callable[..., Any] | None = None,
    cpp_fake: Callable[..., Any] | None = None,
) -> None:
    """Register the implementations of ``op``. All take the same arguments and return the same result.

    ``cuda_fake`` is the fake (meta) impl of the extension's ``regops_C::<op>`` schema, so that op also traces;
    ``cpp_fake`` that of ``regops_cpu::<op>`` (default: the reference itself).
    """
    if op in _REGISTRY:
        raise RuntimeError(f"regops: op {op!r} is registered twice")
    _REGISTRY[op] = _OpImpls(torch=torch, triton=triton, cuda=cuda, cuda_fake=cuda_fake, cpp_fake=cpp_fake)
    if _EXT_STATE.get("module") is not None:
        _register_cuda_fake(op)


def _register_cuda_fake(op: str) -> None:
    fake = _REGISTRY[op].cuda_fake
    if fake is not None and hasattr(torch.ops.regops_C, op):
        torch.library.register_fake(f"regops_C::{op}", fake)
    # A C++ CPU kernel has the reference's signature and the reference is plain tensor code: it is the fake impl.
    if hasattr(getattr(torch.ops, CPP_NAMESPACE), op):
        torch.library.register_fake(f"{CPP_NAMESPACE}::{op}", _REGISTRY[op].cpp_fake or _REGISTRY[op].torch)


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend (``"torch"``, ``"triton"``, ``"cuda"``, ``"cpp"``) inside the block; ``None`` restores
    automatic.

    >>> with regops.use_backend("torch"):
    ...     y = regops.dropout(x, 0.1)   # the reference, even on a CUDA tensor
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"regops: unknown backend {name!r}; choose one of {BACKENDS} or None")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``REGOPS_BACKEND``, or ``None`` for automatic."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get("REGOPS_BACKEND", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"regops: REGOPS_BACKEND={env!r} is not one of {BACKENDS} or 'auto'")
    return env


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


# ----------------------------------------------------------------------------------------------- extension
_EXT_STATE: dict[str, Any] = {}


def extension() -> Any | None:
    """The loaded ``regops._C`` module, or ``None`` (not built, or built for another torch: one warning)."""
    if "module" not in _EXT_STATE:
        _EXT_STATE["module"], _EXT_STATE["reason"] = _load_extension()
        if _EXT_STATE["module"] is not None:
            for op in _REGISTRY:
                _register_cuda_fake(op)
    return _EXT_STATE["module"]


def extension_status() -> str:
    extension()
    return _EXT_STATE["reason"]


def reset_extension() -> None:
    """Forget the extension state so that the next op looks again (after a just-in-time build)."""
    _EXT_STATE.clear()


def _load_extension() -> tuple[Any | None, str]:
    """``REGOPS_EXT``: ``auto`` (prebuilt regops._C, else a cached just-in-time build), ``prebuilt``, ``jit``
    (a cached just-in-time build, built on first use on a GPU machine when missing) or ``off``."""
    mode = os.environ.get("REGOPS_EXT", "auto").strip().lower() or "auto"
    if mode not in ("auto", "prebuilt", "jit", "off"):
        raise ValueError(f"regops: REGOPS_EXT={mode!r} is not one of auto, prebuilt, jit, off")
    if mode == "off":
        return None, "disabled (REGOPS_EXT=off)"
    reason = "not built (installed without a C++ compiler, or with REGOPS_BUILD_EXT=0)"
    problem = None  # why a prebuilt regops._C was not loaded: warned about only if nothing else loads
    if mode in ("auto", "prebuilt") and importlib.util.find_spec("regops._C") is not None:
        module, problem = _load_prebuilt()
        if module is not None:
            return module, "loaded"
        reason = problem
        if mode == "prebuilt":
            _warn_fallback(problem)
            return None, reason
    if mode in ("auto", "jit"):
        from regops import _jit

        path = _jit.load_cached()
        if path is None and mode == "jit" and torch.cuda.is_available():
            path = _jit.build()
        if path is not None:
            skipped = f"; the prebuilt one was not used: {problem}" if problem else ""
            return types.SimpleNamespace(__file__=str(path)), f"loaded (just-in-time build {path}{skipped})"
    if problem:
        _warn_fallback(problem)
    return None, reason


def _warn_fallback(problem: str) -> None:
    warnings.warn(
        f"regops: {problem}; CPU ops fall back to the reference, GPU ops to Triton", RuntimeWarning, stacklevel=5
    )


def _load_prebuilt() -> tuple[Any | None, str]:
    """The prebuilt ``regops._C``, or ``None`` and why it was not loaded."""
    from regops import _build_info

    mismatch = _build_info.torch_mismatch()
    if mismatch:
        return None, f"regops._C was built for {mismatch}; not loading it"
    try:
        module = importlib.import_module("regops._C")
    except (ImportError, OSError) as exc:  # undefined symbols from an ABI change, missing libcudart, ...
        return None, f"regops._C failed to load ({exc})"
    return module, "loaded"


def extension_has(op: str) -> bool:
    return extension() is not None and hasattr(torch.ops.regops_C, op)


def cpp_kernel(op: str) -> bool:
    """Whether the loaded extension registers a C++ CPU kernel ``regops_cpu::<op>`` (looked up once per op)."""
    if extension() is None:
        return False
    found = _EXT_STATE.setdefault("cpp_kernels", {})
    if op not in found:
        name = f"{CPP_NAMESPACE}::{op}"
        # An op with no tensor argument (hessian_probes) has nothing to dispatch on: its kernel is registered as
        # CompositeExplicitAutograd and checks that the device is the CPU.
        found[op] = hasattr(getattr(torch.ops, CPP_NAMESPACE), op) and any(
            torch._C._dispatch_has_kernel_for_dispatch_key(name, key) for key in ("CPU", "CompositeExplicitAutograd")
        )
    return found[op]


def _call_cpp(op: str) -> Callable[..., Any]:
    return getattr(getattr(torch.ops, CPP_NAMESPACE), op)


# ----------------------------------------------------------------------------------------------- choice
def _why_not(op: str, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``; otherwise the reason it cannot."""
    impls = _REGISTRY[op]
    if backend == "torch":
        return None
    if backend == "triton":
        if impls.triton is None:
            return f"no Triton kernel for {op!r}"
        if not triton_importable():
            return "Triton is not installed (it ships with torch's CUDA wheels; `pip install triton`)"
        if device.type == "cpu" and not triton_interpreted():
            return "Triton kernels run on CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device.type} tensors"
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ CPU kernels run on CPU tensors, not {device.type}"
        if extension() is None:
            return f"the extension regops._C is unavailable: {_EXT_STATE.get('reason', 'not loaded')}"
        if not cpp_kernel(op):
            return f"this build of regops._C has no C++ CPU kernel for {op!r}"
        return None
    # cuda
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors, not {device.type}"
    if impls.cuda is None:
        return f"the CUDA extension has no kernel for {op!r}"
    if extension() is None:
        return f"the CUDA extension regops._C is unavailable: {_EXT_STATE.get('reason', 'not loaded')}"
    if not hasattr(torch.ops.regops_C, op):
        return f"this build of regops._C has no op {op!r} (rebuild it)"
    return None


def choose(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device`` (raises if the forced one cannot)."""
    if op not in _REGISTRY:
        raise KeyError(f"regops: unknown op {op!r}")
    forced = requested_backend()
    if forced is not None:
        reason = _why_not(op, forced, device)
        if reason is not None:
            raise BackendUnavailableError(f"regops: backend {forced!r} cannot run {op!r} on {device}: {reason}")
        return forced
    if device.type != "cuda":
        return "cpp" if device.type == "cpu" and _why_not(op, "cpp", device) is None else "torch"
    reasons = []
    for candidate in ("cuda", "triton"):
        reason = _why_not(op, candidate, device)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    raise BackendUnavailableError(
        f"regops: no GPU kernel can run {op!r} on {device} ({'; '.join(reasons)}). "
        "Install Triton or build regops._C, or use REGOPS_BACKEND=torch to run the reference on the GPU."
    )


def implementation(op: str, device: torch.device) -> Callable[..., Any]:
    """The callable chosen by :func:`choose` for ``op`` on ``device``."""
    backend = choose(op, device)
    impls = _REGISTRY[op]
    fn = impls.resolved.get(backend)
    if fn is None:
        target = _call_cpp(op) if backend == "cpp" else getattr(impls, backend)
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
        fn = impls.resolved[backend] = target
    return fn


def availability(op: str, device: torch.device) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run ``op`` on ``device`` or the reason it cannot."""
    return {b: _why_not(op, b, device) for b in BACKENDS}
