"""The dropout family: dropout (mask regenerated or 1-bit packed), fused bias/residual/norm variants,
structured masks (shared dims, channels, drop path, nested), multi-sample dropout and the R-Drop consistency loss.

Every random draw comes from the one Philox stream (:mod:`regops._rng`); every mask is a function of
(seed, offset, logical index) and is bit-identical across the reference, Triton and CUDA backends.
"""

from regops.dropout import _core, consistency, fused, structured
from regops.dropout._core import *  # noqa: F403
from regops.dropout.consistency import *  # noqa: F403
from regops.dropout.fused import *  # noqa: F403
from regops.dropout.structured import *  # noqa: F403

__all__ = [*_core.__all__, *fused.__all__, *structured.__all__, *consistency.__all__]
