"""Data valuation from per-example gradients, built on the per-example engine (`regops.per_example`).

* `per_sample_grad_dots`: exact ``[B_train, B_test]`` per-example gradient inner products (ghost forms);
* `tracin`: TracIn influence over checkpoints, dense or streamed top-k proponents / opponents;
* `data_scores`: GraNd, EL2N, loss, entropy, margin per example in dataset order (averaged over seeds);
* `gradient_coherence`: coherence ``||mean g||^2 / mean ||g||^2`` and the gradient covariance trace;
* `empirical_fisher_diagonal`: exact mean of squared per-example gradients (true or sampled labels).

The kernel-backed pieces are the engine's ``regops::valuation_cross_gram`` and ``regops::valuation_sq_grad_sum``.
"""

from regops.valuation.api import *  # noqa: F403
from regops.valuation.api import __all__ as __all__
