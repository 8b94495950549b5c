"""``python -m regops.info``: versions, the extension (its C++ CPU and CUDA parts), and which backend runs each op
here."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from regops._core import dispatch, extension


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [
        f"regops        {_version('regops')}",
        f"python        {platform.python_version()} ({platform.machine()})",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton        {_version('triton')}",
    ]
    cuda = torch.cuda.is_available()
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"GPU           {', '.join(names)}")
    else:
        lines.append("GPU           none")
    status = extension.status()
    info = extension.build_info()
    lines.append(f"regops._C     {status}")
    if extension.load() is not None:
        cpp_ops = _cpp_ops()
        lines.append(f"  CPU kernels {'C++, ' + str(len(cpp_ops)) + ' ops' if cpp_ops else 'none in this build'}")
        cuda_built = info.get("cuda_kernels", bool(info.get("cuda_archs")))
        lines.append(f"  CUDA kernels {'yes' if cuda_built else 'no (built without nvcc or without a CUDA torch)'}")
    if info:
        cuda = f", CUDA {info.get('cuda_version')}" if info.get("cuda_version") else ""
        lines.append(
            f"  built with  torch {info.get('torch_version')}{cuda}, git {info.get('git_revision') or 'unknown'}"
        )
        if info.get("cuda_archs"):
            lines.append(f"  archs       {' '.join(info['cuda_archs'])}")
    interp = " (TRITON_INTERPRET=1)" if dispatch.triton_interpreted() else ""
    lines.append(f"REGOPS_BACKEND {dispatch.requested_backend() or 'auto'}{interp}")
    lines.append("")
    # Without a GPU the cuda column still tells which kernel a CUDA tensor would get with this install.
    devices = [torch.device("cpu"), torch.device("cuda")]
    if not cuda:
        lines.append("(no GPU here: the cuda column is what CUDA tensors would use with this install)")
    ops = dispatch.registered_ops()
    width = max([len(op) for op in ops] + [2]) + 2
    header = f"{'op':<{width}}" + "".join(f"{d.type:<10}" for d in devices) + "available backends"
    lines.append(header)
    for op in ops:
        row = f"{op:<{width}}"
        avail = []
        for device in devices:
            try:
                row += f"{dispatch.choose(op, device):<10}"
            except dispatch.BackendUnavailableError:
                row += f"{'-':<10}"
            avail += [f"{b}:{device.type}" for b, why in dispatch.availability(op, device).items() if why is None]
        lines.append(row + " ".join(avail))
    return "\n".join(lines)


def summary() -> str:
    """One line: the regops version and what its extension provides here (or why it is not loaded)."""
    status = extension.status()
    if extension.load() is None:
        return f"regops {_version('regops')}: extension regops._C {status}"
    info = extension.build_info()
    cpp_ops = len(_cpp_ops())
    cuda_built = info.get("cuda_kernels", bool(info.get("cuda_archs")))
    archs = " ".join(info.get("cuda_archs", []))
    return (
        f"regops {_version('regops')}: extension regops._C {status}: C++ CPU kernels for {cpp_ops} ops, "
        f"CUDA kernels {'for ' + archs if cuda_built else 'not built'}"
    )


def _cpp_ops() -> list[str]:
    """The ops the loaded extension runs on CPU tensors with a C++ kernel."""
    return [op for op in dispatch.registered_ops() if dispatch.native_registered(op, "cpp")]


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
