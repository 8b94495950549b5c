"""Dropout: regops (mask regenerated in backward) against eager F.dropout and torch.compile(F.dropout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import regops
from benchmarks.harness import Setup, case, compiled

P = 0.1
SIZES = {  # (device type, quick) -> [(numel, dtype)]
    ("cuda", False): [(1 << 26, torch.bfloat16), (1 << 24, torch.float32)],
    ("cuda", True): [(1 << 22, torch.bfloat16)],
    ("cpu", False): [(1 << 22, torch.float32)],
    ("cpu", True): [(1 << 18, torch.float32)],
}


def _input(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(numel, device=device, dtype=dtype, requires_grad=True)


def _fns():
    eager = lambda t: F.dropout(t, P)
    return {"regops": lambda t: regops.dropout(t, P), "eager": eager, "compile": compiled(eager)}


def _register(direction: str) -> None:
    for quick in (False, True):
        for device_type in ("cpu", "cuda"):
            for numel, dtype in SIZES[(device_type, quick)]:
                params = f"n={numel} {str(dtype).removeprefix('torch.')}" + (" quick" if quick else "")

                def make(device, is_quick, numel=numel, dtype=dtype, quick=quick, device_type=device_type):
                    if is_quick != quick or device.type != device_type:
                        return None
                    return _setup(direction, numel, dtype, device)

                case("dropout", f"dropout {direction}", params, devices=(device_type,))(make)


def _setup(direction: str, numel: int, dtype: torch.dtype, device: torch.device) -> Setup:
    x = _input(numel, dtype, device)
    grad = torch.randn_like(x)
    nbytes = numel * x.element_size()
    fns = _fns()
    forward = {name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}
    if direction == "forward":
        variants = {name: _no_grad(fn, x) for name, fn in fns.items()}
        return Setup(variants, bytes=2 * nbytes, forward=forward)
    if direction == "backward":
        variants = {}
        for name, fn in fns.items():
            y = fn(x)
            variants[name] = lambda y=y: torch.autograd.grad(y, x, grad, retain_graph=True)
        return Setup(variants, bytes=2 * nbytes, forward=forward)
    variants = {name: (lambda fn=fn: torch.autograd.grad(fn(x), x, grad)) for name, fn in fns.items()}
    return Setup(variants, bytes=4 * nbytes, forward=forward, note="fwd+bwd")


def _no_grad(fn, x):
    def run():
        with torch.no_grad():
            return fn(x)

    return run


for _direction in ("forward", "backward", "forward+backward"):
    _register(_direction)


# ------------------------------------------------------------------------------------------------ fused family
# Each case times forward+backward of the same composition: regops' fused op, eager PyTorch, torch.compile of
# the eager composition (and timm where it does the same job). Sizes: (device type, quick) -> params.
def _fwd_bwd(fns: dict, inputs: list[torch.Tensor], grads_of) -> dict:
    """fn(*inputs) -> output(s); returns callables that run forward + backward w.r.t. every input."""

    def run(fn):
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, inputs, [grads_of(o) for o in outs])

    return {name: (lambda fn=fn: run(fn)) for name, fn in fns.items()}


def _family_case(name: str, sizes: dict, build) -> None:
    for (device_type, quick), params_list in sizes.items():
        for params in params_list:
            label = " ".join(f"{k}={str(v).removeprefix('torch.')}" for k, v in params.items()) + (
                " quick" if quick else ""
            )

            def make(device, is_quick, params=params, quick=quick, device_type=device_type):
                if is_quick != quick or device.type != device_type:
                    return None
                return build(device, **params)

            case("dropout", name, label, devices=(device_type,))(make)


def _rand(shape, dtype, device, grad=True):
    return torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)


ROWS_SIZES = {
    ("cuda", False): [
        {"rows": 16384, "cols": 4096, "dtype": torch.bfloat16},
        {"rows": 8192, "cols": 1024, "dtype": torch.float32},
    ],
    ("cuda", True): [{"rows": 2048, "cols": 1024, "dtype": torch.bfloat16}],
    ("cpu", False): [{"rows": 4096, "cols": 1024, "dtype": torch.float32}],
    ("cpu", True): [{"rows": 256, "cols": 512, "dtype": torch.float32}],
}


def _bias_dropout_add(device, rows, cols, dtype):
    x, r, b = _rand((rows, cols), dtype, device), _rand((rows, cols), dtype, device), _rand((cols,), dtype, device)
    eager = lambda x, b, r: r + F.dropout(x + b, P)
    fns = {"regops": lambda x, b, r: regops.bias_dropout_add(x, b, r, P), "eager": eager, "compile": compiled(eager)}
    n = rows * cols * x.element_size()
    forward = {k: (lambda f=f: f(x, b, r)) for k, f in fns.items()}
    # Minimal traffic: fwd reads x, r, writes y; bwd reads g, writes dx (dresidual is g itself).
    return Setup(_fwd_bwd(fns, [x, b, r], torch.ones_like), bytes=5 * n, forward=forward, note="fwd+bwd")


_family_case("bias_dropout_add fwd+bwd", ROWS_SIZES, _bias_dropout_add)


def _dropout_add_layer_norm(device, rows, cols, dtype):
    x, r = _rand((rows, cols), dtype, device), _rand((rows, cols), dtype, device)
    w, b = _rand((cols,), torch.float32, device), _rand((cols,), torch.float32, device)

    def eager(x, r, w, b):
        s = F.dropout(x, P) + r
        return F.layer_norm(s.float(), (cols,), w, b).to(x.dtype), s

    fns = {
        "regops": lambda x, r, w, b: regops.dropout_add_layer_norm(x, r, w, b, P, prenorm=True),
        "eager": eager,
        "compile": compiled(eager),
    }
    n = rows * cols * x.element_size()
    forward = {k: (lambda f=f: f(x, r, w, b)) for k, f in fns.items()}
    # fwd reads x, r, writes y, s; bwd reads dy, ds, s, writes dx, dresidual.
    return Setup(_fwd_bwd(fns, [x, r, w, b], torch.ones_like), bytes=9 * n, forward=forward, note="fwd+bwd")


_family_case("dropout_add_layer_norm fwd+bwd", ROWS_SIZES, _dropout_add_layer_norm)


def _drop_path_add(device, rows, cols, dtype):
    batch = 64
    shape = (batch, rows // batch, cols)
    x, r = _rand(shape, dtype, device), _rand(shape, dtype, device)
    eager = lambda x, r: r + _timm_drop_path(x)
    fns = {
        "regops": lambda x, r: regops.drop_path_add(x, r, P, training=True),
        "eager": eager,
        "compile": compiled(eager),
    }
    n = x.numel() * x.element_size()
    forward = {k: (lambda f=f: f(x, r)) for k, f in fns.items()}
    return Setup(_fwd_bwd(fns, [x, r], torch.ones_like), bytes=5 * n, forward=forward, note="fwd+bwd; eager = timm")


def _timm_drop_path(x):
    try:
        from timm.layers import drop_path
    except ImportError:  # same math as timm
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - P).div_(1 - P)
        return x * keep
    return drop_path(x, P, True)


_family_case("drop_path_add fwd+bwd", ROWS_SIZES, _drop_path_add)


def _dropout_bitmask(device, rows, cols, dtype):
    x = _rand((rows, cols), dtype, device)
    eager = lambda x: F.dropout(x, P)
    fns = {
        "regops": lambda x: regops.dropout(x, P, mask_mode="bitmask"),
        "eager": eager,
        "compile": compiled(eager),
    }
    n = x.numel() * x.element_size()
    forward = {k: (lambda f=f: f(x)) for k, f in fns.items()}
    return Setup(_fwd_bwd(fns, [x], torch.ones_like), bytes=4 * n + 2 * x.numel() // 8, forward=forward, note="fwd+bwd")


_family_case("dropout bitmask fwd+bwd", ROWS_SIZES, _dropout_bitmask)

VOCAB_SIZES = {
    ("cuda", False): [{"rows": 4096, "vocab": 32000, "dtype": torch.bfloat16}],
    ("cuda", True): [{"rows": 256, "vocab": 32000, "dtype": torch.bfloat16}],
    ("cpu", False): [{"rows": 128, "vocab": 32000, "dtype": torch.float32}],
    ("cpu", True): [{"rows": 16, "vocab": 8000, "dtype": torch.float32}],
}


def _symmetric_kl(device, rows, vocab, dtype):
    a, b = _rand((rows, vocab), dtype, device), _rand((rows, vocab), dtype, device)

    def eager(a, b):
        la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
        return 0.5 * ((la.exp() - lb.exp()) * (la - lb)).sum(-1).mean()

    fns = {"regops": lambda a, b: regops.symmetric_kl(a, b), "eager": eager, "compile": compiled(eager)}
    n = a.numel() * a.element_size()
    forward = {k: (lambda f=f: f(a, b)) for k, f in fns.items()}
    # fwd reads a, b twice; bwd reads a, b and writes both gradients.
    return Setup(_fwd_bwd(fns, [a, b], torch.ones_like), bytes=8 * n, forward=forward, note="fwd+bwd")


_family_case("symmetric_kl fwd+bwd", VOCAB_SIZES, _symmetric_kl)

HEAD_SIZES = {
    ("cuda", False): [{"batch": 4096, "features": 4096, "classes": 1000, "k": 8}],
    ("cuda", True): [{"batch": 512, "features": 1024, "classes": 100, "k": 8}],
    ("cpu", False): [{"batch": 512, "features": 1024, "classes": 100, "k": 8}],
    ("cpu", True): [{"batch": 64, "features": 256, "classes": 10, "k": 4}],
}


def _multi_sample(device, batch, features, classes, k):
    x = _rand((batch, features), torch.float32, device)
    head = torch.nn.Linear(features, classes, device=device)
    msd = regops.nn.MultiSampleDropout(head, num_samples=k, p=0.5)
    eager = lambda x: torch.stack([head(F.dropout(x, 0.5)) for _ in range(k)]).mean(0)
    fns = {"regops": msd, "eager": eager, "compile": compiled(eager)}
    n = x.numel() * x.element_size()
    forward = {name: (lambda f=f: f(x)) for name, f in fns.items()}
    return Setup(_fwd_bwd(fns, [x], torch.ones_like), bytes=4 * n, forward=forward, note=f"fwd+bwd, K={k} linear head")


_family_case("multi_sample_dropout fwd+bwd", HEAD_SIZES, _multi_sample)
