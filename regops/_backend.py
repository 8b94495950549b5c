"""Backend choice for the ops not yet declared with :func:`regops._core.ops.declare` (their C++ kernels live in
the ``regops_cpu`` / ``regops_C`` namespaces with the reference's signature). Forcing a backend and loading the
extension are shared with :mod:`regops._core.dispatch`.

Every such op registers its implementations here under one name, all with the same signature:

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

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from regops._core import dispatch
from regops._core import extension as _extension
from regops._core.dispatch import (  # noqa: F401
    BACKENDS,
    BackendUnavailableError,
    requested_backend,
    triton_importable,
    triton_interpreted,
    use_backend,
)

CPP_NAMESPACE = "regops_cpu"


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
_CPP_KERNELS: dict[str, bool] = {}
_FAKES_DONE: set[str] = set()


def register(
    op: str,
    *,
    torch: Callable[..., Any],
    triton: Callable[..., Any] | str | None = None,
    cuda: Callable[..., Any] | None = None,
    cuda_fake: Callable[..., Any] | None = None,
    cpp_fake: Callable[..., Any] | None = None,
) -> None:
    """Register the implementations of ``op``. All take the same arguments and return the same result."""
    if op in _REGISTRY:
        raise RuntimeError(f"regops: op {op!r} is registered twice")
    _REGISTRY[op] = _OpImpls(torch=torch, triton=triton, cuda=cuda, cuda_fake=cuda_fake, cpp_fake=cpp_fake)
    if _extension.loaded():
        _register_cuda_fake(op)


def _register_cuda_fake(op: str) -> None:
    if op in _FAKES_DONE:
        return
    _FAKES_DONE.add(op)
    fake = _REGISTRY[op].cuda_fake
    if fake is not None and hasattr(torch.ops.regops_C, op):
        torch.library.register_fake(f"regops_C::{op}", fake)
    if hasattr(getattr(torch.ops, CPP_NAMESPACE), op):
        torch.library.register_fake(f"{CPP_NAMESPACE}::{op}", _REGISTRY[op].cpp_fake or _REGISTRY[op].torch)


def registered_ops() -> list[str]:
    """Every op, declared with :func:`regops._core.ops.declare` or registered here."""
    return sorted(set(_REGISTRY) | set(dispatch.registered_ops()))


def extension() -> Any | None:
    module = _extension.load()
    if module is not None:
        for op in _REGISTRY:
            _register_cuda_fake(op)
    return module


def extension_status() -> str:
    return _extension.status()


def extension_has(op: str) -> bool:
    return extension() is not None and hasattr(torch.ops.regops_C, op)


def cpp_kernel(op: str) -> bool:
    if op in dispatch.registered_ops():
        return dispatch.why_not(op, "cpp", torch.device("cpu")) is None and not dispatch.declared(op).composite
    return _cpp_kernel(op)


def _cpp_kernel(op: str) -> bool:
    """Whether the loaded extension registers a C++ CPU kernel ``regops_cpu::<op>`` (looked up once per op)."""
    if extension() is None:
        return False
    found = _CPP_KERNELS
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
            return f"the extension regops._C is unavailable: {_extension.status()}"
        if not cpp_kernel(op):
            return f"this build of regops._C has no C++ CPU kernel for {op!r}"
        return None
    # cuda
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors, not {device.type}"
    if impls.cuda is None:
        return f"the CUDA extension has no kernel for {op!r}"
    if extension() is None:
        return f"the CUDA extension regops._C is unavailable: {_extension.status()}"
    if not hasattr(torch.ops.regops_C, op):
        return f"this build of regops._C has no op {op!r} (rebuild it)"
    return None


def choose(op: str, device: torch.device) -> str:
    if op in dispatch.registered_ops():
        return dispatch.choose(op, device)
    return _choose(op, device)


def _choose(op: str, device: torch.device) -> str:
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
    if op in dispatch.registered_ops():
        return dispatch.availability(op, device)
    return _availability(op, device)


def _availability(op: str, device: torch.device) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run ``op`` on ``device`` or the reason it cannot."""
    return {b: _why_not(op, b, device) for b in BACKENDS}


def device_seed(seed: torch.Tensor | int, offset: int | None, device: torch.device) -> torch.Tensor:
    """The int64 ``[2]`` seed tensor on ``device`` that a CUDA extension kernel reads (from ``seed_args``'s pair)."""
    if isinstance(seed, torch.Tensor):
        return seed if seed.device == device else seed.to(device)
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def seed_args(seed: torch.Tensor, op: str, device: torch.device) -> tuple[int | torch.Tensor, int | None]:
    """``(key, offset)`` as the implementation of ``op`` chosen for ``device`` takes them: host ints for the
    reference and the C++ CPU kernels, the seed tensor itself for the Triton and CUDA kernels."""
    if choose(op, device) in ("torch", "cpp"):
        key, offset = seed.tolist()
        return key, offset
    return seed, None
