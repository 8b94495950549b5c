"""The optim family: sharpness-aware steps (SAM, ASAM, GSAM, LookSAM) and regularized optimizer updates (AdamW, SGD with
decoupled, cautious, L2-SP and EWC decay, Grokfast, annealed gradient noise, coordinate-wise and adaptive clipping,
AdamP's radial projection) as multi-tensor kernels: one pass over all the parameters per stage, GradScaler-native,
capturable, and sharded-parameter aware (FSDP2).

Each op takes lists of tensors: the C++ CPU kernel loops over them, the Triton kernel is one launch over a table of
addresses, and the reference (`regops.optim.reference`) is the per-tensor math they are tested against.
"""

from regops.optim.api import *  # noqa: F403
from regops.optim.api import __all__ as _api_all
from regops.optim.nn import preserve_bn_stats

__all__ = [*_api_all, "preserve_bn_stats"]
