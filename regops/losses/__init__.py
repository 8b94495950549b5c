"""The losses family: every row-softmax loss, on one online-softmax machinery.

* :func:`cross_entropy` -- cross-entropy with label smoothing, MaxSup, z-loss, confidence penalty, mixed and
  decoupled targets, sparse teacher targets, class/token weights, softcap, and per-row statistics;
* :func:`linear_cross_entropy` -- the same on ``hidden @ weight.T`` without materialising the logits;
* :func:`mix_cross_entropy`, :func:`soft_target_cross_entropy`, :func:`mix_binary_cross_entropy` -- MixUp /
  CutMix losses from the index labels of a :class:`regops.MixedBatch` and timm's soft-target losses;
* :func:`symmetric_kl` -- R-Drop's two-view consistency loss;
* :func:`causal_lm_loss` -- the loss for Hugging Face causal LMs (``model.loss_function = ...``).

Modules: :mod:`regops.losses.nn`. Ops: :mod:`regops.losses.ops`; references: :mod:`regops.losses.reference`,
:mod:`regops.losses.reference_mixed`; Triton: :mod:`regops.losses.triton` (kernels in ``regops.kernels.losses``,
``losses_mixed``, ``symmetric_kl``).
"""

from regops.losses.api import *  # noqa: F403
from regops.losses.api import __all__ as _api_all
from regops.losses.nn import MixCrossEntropy, SoftTargetCrossEntropy

__all__ = [*_api_all, "MixCrossEntropy", "SoftTargetCrossEntropy"]
