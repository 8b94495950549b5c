"""The penalties family: regularizers fused into activations and weights -- activation sparsity (ReLU / ReLU^2 /
FATReLU with an L1 gradient fused into backward), batched spectral norms, and the orthogonality penalty."""

from regops.penalties.api import *  # noqa: F403
from regops.penalties.api import __all__ as __all__
