"""The merge family: task arithmetic, DARE, TIES, DARE-TIES and DELLA merges of K deltas into a base, streamed
over a state dict tensor by tensor with constant extra memory and reproducible Philox masks.

A namespace users import: ``regops.merge.dare(base, deltas, density=0.1)``.
"""

from regops.merge.api import *  # noqa: F403
from regops.merge.api import __all__ as __all__
