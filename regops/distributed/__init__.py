"""regops on torch's own parallel engines (DTensor / FSDP2 / tensor parallelism).

Masks are a function of (seed, offset, logical element index), so a sharded tensor can compute exactly the
elements of the single-process mask it holds: ``regops.dropout(dtensor)`` drops the same elements whatever the
layout (1, 2 or 8 ways, any dim, uneven shards), and ``.full_tensor()`` equals the single-process result for
the same seed. The public functions of :mod:`regops.dropout` and :mod:`regops.mix` forward DTensor inputs to
:mod:`regops.dropout.dtensor` and :mod:`regops.mix.dtensor`; the op that runs on a shard is
``regops::global_mask_apply`` (:mod:`regops.dropout.ops`).

Importing this package does not import ``torch.distributed.tensor``; the submodules that need it do.
"""

from regops.distributed._hook import is_dtensor

__all__ = ["is_dtensor"]
