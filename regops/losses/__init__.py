"""The losses family: every row-softmax loss, on one online-softmax machinery.

* `cross_entropy` -- cross-entropy with label smoothing, MaxSup, z-loss, confidence penalty, mixed and
  decoupled targets, sparse teacher targets, class/token weights, softcap, and per-row statistics;
* `linear_cross_entropy` -- the same on ``hidden @ weight.T`` without materialising the logits;
* `mix_cross_entropy`, `soft_target_cross_entropy`, `mix_binary_cross_entropy` -- MixUp /
  CutMix losses from the index labels of a `regops.MixedBatch` and timm's soft-target losses;
* `symmetric_kl` -- R-Drop's two-view consistency loss;
* `causal_lm_loss` -- the loss for Hugging Face causal LMs (``model.loss_function = ...``).

Modules: `regops.losses.nn`. Ops: `regops.losses.ops`; references: `regops.losses.reference`,
`regops.losses.reference_mixed`; Triton: `regops.losses.triton` (kernels in ``regops.kernels.losses``,
``losses_mixed``, ``symmetric_kl``).
"""

from regops.losses.api import *  # noqa: F403
from regops.losses.api import __all__ as _api_all
from regops.losses.nn import MixCrossEntropy, SoftTargetCrossEntropy

__all__ = [*_api_all, "MixCrossEntropy", "SoftTargetCrossEntropy"]
