"""The losses family: every row-softmax loss, on one online-softmax machinery.

* :func:`cross_entropy` -- cross-entropy with label smoothing, MaxSup, z-loss, confidence penalty, mixed and
  decoupled targets, sparse teacher targets, class/token weights, softcap, and per-row statistics;
* :func:`linear_cross_entropy` -- the same on ``hidden @ weight.T`` without materialising the logits;
"""

from regops.losses import regularized
from regops.losses.regularized import *  # noqa: F403

__all__ = [*regularized.__all__]
