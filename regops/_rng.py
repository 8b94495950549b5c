"""Seeds for the counter-based Philox stream, drawn from torch's generators.

An op that draws random bits takes one int64 tensor ``seed`` of shape ``[2]`` on the CPU: the Philox key and the
first counter of this call. Element ``i`` of the call uses counter ``offset + i // 4``, word ``i % 4`` (see
:mod:`regops.reference.philox`), so a call that draws ``n`` words advances the stream by ``ceil(n / 4)`` counters.

* CUDA tensors use the CUDA generator like torch's own kernels: key = its seed, counter = its Philox offset,
  which is advanced past this call (so ``torch.manual_seed`` / ``torch.cuda.manual_seed`` reproduce runs).
* CPU tensors (and everything under ``torch.compile``, where a traced ``torch.randint`` stands in) draw a fresh
  key and offset from the CPU generator, advancing it.
"""

from __future__ import annotations

import torch

_MASK63 = (1 << 63) - 1


def counters_for(n_words: int) -> int:
    return (n_words + 3) // 4


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"regops: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"regops: the generator is on {generator.device} but the tensor is on {device}; "
            f"pass a torch.Generator(device={device.type!r})"
        )


def philox_seed(device: torch.device, n_words: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Key and first counter for a call that draws ``n_words`` 32-bit words on ``device``; advances the generator."""
    check_generator(generator, device)
    n_counters = counters_for(max(n_words, 0))
    if torch.compiler.is_compiling() or device.type != "cuda":
        return torch.randint(0, 1 << 62, (2,), dtype=torch.int64, generator=generator)
    gen = generator if generator is not None else torch.cuda.default_generators[_cuda_index(device)]
    key = gen.initial_seed()
    offset = gen.get_offset()
    gen.set_offset(offset + (n_counters + 3) // 4 * 4)  # torch requires multiples of 4
    # Keep the key's bits; int64 storage reads them back as two's complement.
    key = key - (1 << 64) if key > _MASK63 else key
    return torch.tensor([key, offset], dtype=torch.int64)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
