"""The losses family: every row-softmax loss, on one online-softmax machinery.

* :func:`cross_entropy` -- cross-entropy with label smoothing, MaxSup, z-loss, confidence penalty, mixed and
  decoupled targets, sparse teacher targets, class/token weights, softcap, and per-row statistics;
* :func:`linear_cross_entropy` -- the same on ``hidden @ weight.T`` without materialising the logits;
* :func:`mix_cross_entropy`, :func:`soft_target_cross_entropy`, :func:`mix_binary_cross_entropy` -- MixUp /
  CutMix losses from index labels and timm's soft-target losses (:mod:`regops.losses.mixed`);
* :func:`symmetric_kl` -- R-Drop's two-view consistency loss (:mod:`regops.losses.consistency`);
* :func:`causal_lm_loss` -- the loss for Hugging Face causal LMs (``model.loss_function = ...``).

Kernels: :mod:`regops.kernels.losses` (and :mod:`regops.kernels.symmetric_kl`); references:
:mod:`regops.reference.losses`.
"""

from regops.losses import consistency, hf, mixed, regularized
from regops.losses.consistency import *  # noqa: F403
from regops.losses.hf import *  # noqa: F403
from regops.losses.mixed import *  # noqa: F403
from regops.losses.regularized import *  # noqa: F403

__all__ = [*regularized.__all__, *mixed.__all__, *consistency.__all__, *hf.__all__]
