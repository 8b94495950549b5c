"""LoRA dropout: regops.lora_dropout against PEFT's composition ``lora_A(dropout(x))`` (eager, torch.compile, and
PEFT's own LoRA Linear), forward + backward, with the bytes each saves for backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import regops
from benchmarks.harness import Setup, case, compiled

P = 0.1
SIZES = {  # (device type, quick) -> [(tokens, in_features, r, dtype)]
    ("cuda", False): [(16384, 4096, 16, torch.bfloat16), (8192, 4096, 64, torch.bfloat16)],
    ("cuda", True): [(2048, 1024, 16, torch.bfloat16)],
    ("cpu", False): [(4096, 1024, 16, torch.float32)],
    ("cpu", True): [(512, 256, 16, torch.float32)],
}


def _peft_layer(d_in: int, r: int, dtype, device):
    try:
        import peft
    except ImportError:
        return None
    base = torch.nn.Sequential(torch.nn.Linear(d_in, d_in, bias=False)).to(device, dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=P, target_modules=["0"]))
    return model.base_model.model[0]


def _setup(tokens: int, d_in: int, r: int, dtype, device) -> Setup:
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    A = (torch.randn(r, d_in, device=device, dtype=dtype) / d_in**0.5).requires_grad_()
    g = torch.randn(tokens, r, device=device, dtype=dtype)
    eager = lambda x, A: F.linear(F.dropout(x, P), A)
    fns = {"regops": lambda x, A: regops.lora_dropout(x, A, P), "eager": eager, "compile": compiled(eager)}

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(x, A), (x, A), g)

    variants = {name: fwd_bwd(fn) for name, fn in fns.items()}
    forward = {name: (lambda fn=fn: fn(x, A)) for name, fn in fns.items()}
    layer = _peft_layer(d_in, r, dtype, device)
    if layer is not None:
        gy = torch.randn(tokens, d_in, device=device, dtype=dtype)
        peft_fn = lambda: torch.autograd.grad(layer(x), (x, layer.lora_A["default"].weight), gy)
        patched = regops.nn.PeftLoRALinear.from_module(layer)
        regops_peft = lambda: torch.autograd.grad(patched(x), (x, patched.lora_A["default"].weight), gy)
        variants.update({"peft-layer": peft_fn, "regops-peft-layer": regops_peft})
        forward.update({"peft-layer": lambda: layer(x), "regops-peft-layer": lambda: patched(x)})
    nbytes = 2 * x.numel() * x.element_size()  # read x twice (forward, dA) at least; dx written once more
    return Setup(variants, bytes=nbytes + x.numel() * x.element_size(), flops=3 * 2 * tokens * d_in * r,
                 forward=forward, note="fwd+bwd")  # fmt: skip


for (_device_type, _quick), _sizes in SIZES.items():
    for _tokens, _d, _r, _dtype in _sizes:
        _params = f"tokens={_tokens} d={_d} r={_r} {str(_dtype).removeprefix('torch.')}" + (" quick" if _quick else "")

        def _make(device, is_quick, t=_tokens, d=_d, r=_r, dt=_dtype, q=_quick, dev=_device_type):
            if is_quick != q or device.type != dev:
                return None
            return _setup(t, d, r, dt, device)

        case("masks", "lora_dropout fwd+bwd", _params, devices=(_device_type,))(_make)
