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

DP-SGD clipping (`clip_per_sample_`) reuses the stored ``(A, G)`` with the clip factors (Book-Keeping),
so the clipped sum needs no second backward pass.

The recording, the rules and the kernel-backed forms are the per-example engine's (`regops.per_example`).
"""

from regops.grad_norms.api import *  # noqa: F403
from regops.grad_norms.api import Change as Change
from regops.grad_norms.api import __all__ as __all__
from regops.grad_norms.api import epsilon as epsilon
from regops.grad_norms.api import noise_multiplier_for as noise_multiplier_for
from regops.grad_norms.api import per_sample_squared_norms as per_sample_squared_norms
