"""Host overhead: every public op at a tiny size, where the time is the host's (argument checks, seed draws,
dispatch, autograd bookkeeping), against the torch op or eager composition it replaces and the peer that does the
same job. Each timed run makes ``CALLS`` calls and is timed by the calling thread's CPU time (what host overhead
is made of, and what other processes on the machine cannot inflate); the table reports time per call (``ms``;
multiply by 1000 for microseconds). ``fwd`` cases call the forward only; ``fwd+bwd`` cases run the forward and a
backward of the sum.

    python -m benchmarks --family overhead            # the whole family (add --device cuda on a GPU)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import regops
from benchmarks.harness import Setup, case

CALLS = 100
P = 0.1


def _loop(fn: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        for _ in range(CALLS):
            fn()

    return run


def _backward(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    return lambda: fn().sum().backward()


def _register(name: str, build: Callable[[torch.device], dict[str, Callable[[], torch.Tensor]]]) -> None:
    """Two cases per op: the forward alone, and the forward with the backward of its sum."""
    for direction in ("fwd", "fwd+bwd"):

        def make(device: torch.device, quick: bool, direction: str = direction) -> Setup:
            variants = build(device)
            if direction == "fwd+bwd":
                variants = {k: _backward(v) for k, v in variants.items()}
            else:
                variants = {k: (lambda v=v: torch.no_grad()(v)()) for k, v in variants.items()}
            return Setup({k: _loop(v) for k, v in variants.items()}, bytes=0, calls=CALLS, clock="thread")

        case("overhead", f"{name} {direction}", "tiny")(make)


def _x(device, *shape, grad=True):
    return torch.randn(*shape, device=device, requires_grad=grad)


def _dropout(device):
    x = _x(device, 8, 64)
    return {"regops": lambda: regops.dropout(x, P), "eager": lambda: F.dropout(x, P)}


def _bias_dropout_add(device):
    x, b, r = _x(device, 8, 64), _x(device, 64), _x(device, 8, 64)
    return {"regops": lambda: regops.bias_dropout_add(x, b, r, P), "eager": lambda: r + F.dropout(x + b, P)}


def _dropout_add_layer_norm(device):
    x, r, w, b = _x(device, 8, 64), _x(device, 8, 64), _x(device, 64), _x(device, 64)
    return {
        "regops": lambda: regops.dropout_add_layer_norm(x, r, w, b, P),
        "eager": lambda: F.layer_norm(F.dropout(x, P) + r, (64,), w, b),
    }


def _drop_path(device):
    import timm.layers

    x = _x(device, 8, 64)

    def eager():
        keep = x.new_empty(x.shape[0], 1).bernoulli_(1 - P)
        return x * keep / (1 - P)

    return {
        "regops": lambda: regops.drop_path(x, P, training=True),
        "eager": eager,
        "timm": lambda: timm.layers.drop_path(x, P, training=True),
    }


def _cross_entropy(smoothing: float):
    def build(device):
        logits, y = _x(device, 8, 32), torch.randint(0, 32, (8,), device=device)
        return {
            "regops": lambda: regops.cross_entropy(logits, y, label_smoothing=smoothing),
            "eager": lambda: F.cross_entropy(logits, y, label_smoothing=smoothing),
        }

    return build


_register("dropout", _dropout)
_register("bias_dropout_add", _bias_dropout_add)
_register("dropout_add_layer_norm", _dropout_add_layer_norm)
_register("drop_path", _drop_path)
_register("cross_entropy", _cross_entropy(0.0))
_register("cross_entropy label_smoothing", _cross_entropy(0.1))


def _mixup(mode: str):
    """MixUp/CutMix of a tiny image batch into dense soft targets (no gradient: a data-pipeline op)."""

    def make(device: torch.device, quick: bool) -> Setup:
        from timm.data import Mixup as TimmMixup

        x = torch.randn(8, 3, 8, 8, device=device)
        y = torch.randint(0, 10, (8,), device=device)
        kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=10)
        ours, theirs = regops.Mixup(**kwargs), TimmMixup(**kwargs)
        variants = {
            "regops": lambda: ours(x, y),
            "regops mix_batch": lambda: regops.mix_batch(x, y, mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode),
            "timm": lambda: theirs(x.clone(), y),  # timm mixes in place
        }
        return Setup({k: _loop(v) for k, v in variants.items()}, bytes=0, calls=CALLS, clock="thread")

    case("overhead", f"Mixup {mode}", "8x3x8x8")(make)


_mixup("batch")
_mixup("elem")
