"""regops: fused, memory-light regularization ops for PyTorch.

Importing regops registers its torch.library operators; it never initialises CUDA, imports Triton or loads
the CUDA extension (those happen on the first op that needs them).
"""

from regops import nn
from regops._backend import BackendUnavailableError, use_backend
from regops.dropout import dropout
from regops.patch import PatchHandle, patch

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "PatchHandle",
    "dropout",
    "nn",
    "patch",
    "use_backend",
]
