"""The losses family: every row-softmax loss, on one online-softmax machinery.

* :func:`cross_entropy` -- cross-entropy with label smoothing, MaxSup, z-loss, confidence penalty, mixed and
  decoupled targets, sparse teacher targets, class/token weights, softcap, and per-row statistics;
* :func:`linear_cross_entropy` -- the same on ``hidden @ weight.T`` without materialising the logits;
"""

from regops.losses import cross_entropy as _cross_entropy_module
from regops.losses.cross_entropy import LossStats, cross_entropy, linear_cross_entropy

__all__ = [*_cross_entropy_module.__all__]
