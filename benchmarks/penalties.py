"""Penalties: relu_l1 against eager ``relu`` + ``l1 * sum`` (and torch.compile of it); spectral_norms against
torch's spectral_norm parametrization (one power iteration per weight per forward) and matrix_norm(ord=2);
orthogonality_penalty against the eager ``||W W^T - I||^2`` with autograd."""

from __future__ import annotations

import torch

import regops
from benchmarks.harness import Setup, case, compiled

L1 = 1e-4
ACT = {  # (device type, quick) -> [(tokens, d_ff, dtype)]
    ("cuda", False): [(16384, 11008, torch.bfloat16)],
    ("cuda", True): [(2048, 4096, torch.bfloat16)],
    ("cpu", False): [(4096, 4096, torch.float32)],
    ("cpu", True): [(256, 1024, torch.float32)],
}
SPECTRAL = {  # (device type, quick) -> [(count, m, n)]
    ("cuda", False): [(96, 1024, 1024)],
    ("cuda", True): [(24, 256, 256)],
    ("cpu", False): [(24, 512, 512)],
    ("cpu", True): [(8, 128, 128)],
}


def _relu_l1(tokens, d, dtype, device) -> Setup:
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)

    def eager(x):
        a = torch.relu(x)
        return a, L1 * a.sum()

    def regops_fn(x):
        return regops.relu_l1(x, L1), None

    comp = compiled(eager)

    def run(fn):
        def go():
            a, pen = fn(x)
            outs, grads = (a, pen), (g, torch.ones_like(pen)) if pen is not None else None
            if pen is None:
                return torch.autograd.grad(a, x, g)
            return torch.autograd.grad(outs, x, grads)

        return go

    fns = {"regops": regops_fn, "eager": eager, "compile": comp}
    variants = {k: run(f) for k, f in fns.items()}
    forward = {k: (lambda f=f: f(x)) for k, f in fns.items()}
    return Setup(variants, bytes=4 * x.numel() * x.element_size(), forward=forward, note="fwd+bwd, L1 gradient")


def _spectral(count, m, n, device) -> Setup:
    ws = [torch.randn(m, n, device=device) / n**0.5 for _ in range(count)]
    _, state = regops.spectral_norms(ws, num_iters=5)
    linears = [torch.nn.Linear(n, m, bias=False, device=device) for _ in range(count)]
    for lin, w in zip(linears, ws, strict=True):
        with torch.no_grad():
            lin.weight.copy_(w)
        torch.nn.utils.parametrizations.spectral_norm(lin)

    def torch_param():  # what the parametrization runs per forward: one power iteration per weight
        return [lin.weight for lin in linears]

    variants = {
        "regops": lambda: regops.spectral_norms(ws, state=state),
        "torch-spectral_norm": torch_param,
        "matrix_norm": lambda: [torch.linalg.matrix_norm(w, ord=2) for w in ws],
    }
    return Setup(variants, bytes=2 * count * m * n * 4, note="one warm power iteration per weight")


def _ortho(count, m, n, device) -> Setup:
    w = torch.randn(count, m, n, device=device, requires_grad=True)

    def eager():
        eye = torch.eye(m, device=device)
        return torch.autograd.grad(((w @ w.mT - eye) ** 2).sum(), w)

    variants = {"regops": lambda: torch.autograd.grad(regops.orthogonality_penalty(w).sum(), w), "eager": eager}
    return Setup(variants, bytes=2 * w.numel() * 4, flops=3 * 2 * count * m * m * n, note="fwd+bwd")


def _register(table, name, build):
    for (device_type, quick), sizes in table.items():
        for size in sizes:
            params = " ".join(str(s).removeprefix("torch.") for s in size) + (" quick" if quick else "")

            def make(device, is_quick, size=size, q=quick, dev=device_type):
                if is_quick != q or device.type != dev:
                    return None
                return build(*size, device)

            case("penalties", name, params, devices=(device_type,))(make)


_register(ACT, "relu_l1 fwd+bwd", _relu_l1)
_register(SPECTRAL, "spectral_norms", _spectral)
_register(SPECTRAL, "orthogonality_penalty fwd+bwd", _ortho)
