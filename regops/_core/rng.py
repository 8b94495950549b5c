"""Seeds for the counter-based Philox stream, drawn from torch's generators.

An op that draws random bits takes one int64 tensor ``seed`` of shape ``[2]`` on the tensor's device: the Philox
key and the first counter of this call. Element ``i`` of the call uses counter ``offset + i // 4``, word ``i % 4``
(see :mod:`regops._core.philox`), on the subsequence ``c3 = STREAM_C3`` that torch's own kernels never use.

The seed is drawn by a torch RNG kernel on the tensor's device (``torch.randint`` with the op's generator), and
the GPU kernels read it from device memory (never as a host value baked into the launch):

* CUDA graphs: torch makes its RNG kernels capture-safe (the generator's Philox offset lives on the device and
  advances on every replay), so each replay of a captured step writes a fresh seed into the same buffer and
  every regops kernel of that replay reads it: fresh masks, no host synchronisation, nothing frozen. The same
  holds under ``torch.compile(mode="reduce-overhead")``.
* Reproducibility: ``torch.manual_seed`` / ``torch.cuda.manual_seed`` / a ``generator`` reproduce the draws, and
  the reference given the same seed values (``seed.tolist()``) produces the same bits as every backend.
* The backward of an op keeps the 16-byte seed tensor and regenerates the mask from it.
* Disjoint from torch's own streams whatever the drawn key and offset: regops' counters have ``c3 = STREAM_C3``
  (top bit set), a subsequence torch's Philox kernels (thread index in ``(c2, c3)``) and inductor's RNG
  (``(offset, 0, 0)``) never reach. The draw itself is one of torch's RNG calls and advances the generator.
"""

from __future__ import annotations

import torch

# Keys and first counters in [0, 2**62): offset + counters of any call stay below 2**63 (no sign wrap).
_SEED_RANGE = 1 << 62
_MAX_WORDS = 4 * (1 << 62) - 3  # the fewest words that need 2**62 counters


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
    """Key and first counter (int64 ``[2]`` on ``device``) for a call that draws ``n_words`` 32-bit words.

    Drawn on ``device`` by torch's RNG (capture-safe on CUDA), advancing ``generator`` (default: the device's
    default generator). ``n_words`` only bounds the counters the call uses: any ``n_words < 2**64`` fits above
    the drawn first counter."""
    if generator is not None:
        check_generator(generator, device)
    if n_words >= _MAX_WORDS:  # counters_for(n_words) >= 2**62
        raise ValueError(f"regops: a call cannot draw {n_words} random words")
    return torch.randint(0, _SEED_RANGE, (2,), dtype=torch.int64, device=device, generator=generator)
