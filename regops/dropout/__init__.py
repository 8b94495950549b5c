"""The dropout family: dropout (mask regenerated or 1-bit packed), fused bias/residual/norm variants, structured
masks (shared dims, channels, drop path, nested) and multi-sample dropout.

Every random draw comes from the one Philox stream; every mask is a function of
(seed, offset, logical index) and is bit-identical across the reference, the C++ and CUDA kernels and Triton.
"""

from regops.dropout.api import *  # noqa: F403
from regops.dropout.api import __all__ as __all__
