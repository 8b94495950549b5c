"""Per-example gradient norms from the ordinary backward pass, and DP-SGD clipping built on them.

How it works: forward hooks on the supported layers keep a reference to each layer's input (the tensor that
autograd already saves for the weight gradient) and put a hook on the layer's output; when the ordinary
backward reaches that output, the hook gets the output gradient ``G`` and computes each example's squared
gradient norm for the layer's parameters from ``(A, G)`` without building the ``B x P`` per-example gradients:

* Linear / Conv (unfolded): ``||G_n^T A_n||_F^2`` by the ghost (Gram) form ``<A_n A_n^T, G_n G_n^T>`` or the
  instantiate form, chosen per layer by cost (ghost iff ``2 T^2 <= p d``, as fastDP) or by ``forms=``;
  2-D inputs (``T = 1``) use ``||a_n||^2 ||g_n||^2``.
* Embedding: the rows of repeated ids are summed (``instantiate``) or the id-equality Gram is used
  (``ghost``).
* LayerNorm / GroupNorm / RMSNorm / BatchNorm (eval) and every bias: the per-example gradients are small and
  are built directly.
* Any other use of a trainable parameter (``F.linear(h, emb.weight)``, ``x @ W.T``, ``weight * h``,
  ``nn.MultiheadAttention``'s projections, ``cls_token.expand(B, ...)``) is seen by a ``TorchFunctionMode``
  during the block and recorded as a call of the matching rule, or raises naming the parameter.
* A parameter used by several calls (tied weights) gets ``||sum_i g_i||^2`` from the rules' factors
  (``<U^T V, U'^T V'> = <U U'^T, V V'^T>``), never a dropped use.

DP-SGD clipping (:func:`clip_per_sample_`) reuses the stored ``(A, G)`` with the clip factors (Book-Keeping),
so the clipped sum needs no second backward pass.

The kernel-backed pieces are the ``regops::grad_norms_gram``, ``regops::grad_norms_instantiate`` and
``regops::grad_norms_embedding_gram`` operators (reference in :mod:`regops.reference.grad_norms`, Triton
kernels in ``regops.kernels.grad_norms``).
"""

from __future__ import annotations

from regops.grad_norms.accounting import PrivacyAccountant
from regops.grad_norms.accounting import epsilon as epsilon
from regops.grad_norms.accounting import noise_multiplier_for as noise_multiplier_for
from regops.grad_norms.clipping import DPClipping, clip_per_sample_, dp_clipping
from regops.grad_norms.fix import Change as Change
from regops.grad_norms.fix import fix_model
from regops.grad_norms.layers import LayerRule as LayerRule
from regops.grad_norms.layers import register_rule as register_rule
from regops.grad_norms.layers import registered_rules as registered_rules
from regops.grad_norms.layers import rule_for as rule_for
from regops.grad_norms.norms import PerSampleGradNorms, per_sample_grad_norms
from regops.grad_norms.norms import per_sample_squared_norms as per_sample_squared_norms
from regops.grad_norms.ops import embedding_gram_sq_norms as embedding_gram_sq_norms
from regops.grad_norms.ops import gram_sq_norms as gram_sq_norms
from regops.grad_norms.ops import instantiate_sq_norms as instantiate_sq_norms
from regops.grad_norms.sampling import PoissonBatchSampler

__all__ = [
    "DPClipping",
    "PerSampleGradNorms",
    "PoissonBatchSampler",
    "PrivacyAccountant",
    "clip_per_sample_",
    "dp_clipping",
    "fix_model",
    "per_sample_grad_norms",
]
