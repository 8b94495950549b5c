"""Data valuation from per-example gradients, built on the per-layer rules of :mod:`regops.grad_norms`.

* :func:`per_sample_grad_dots`: exact ``[B_train, B_test]`` per-example gradient inner products (ghost forms);
* :func:`tracin`: TracIn influence over checkpoints, dense or streamed top-k proponents / opponents;
* :func:`data_scores`: GraNd, EL2N, loss, entropy, margin per example in dataset order (averaged over seeds);
* :func:`gradient_coherence`: coherence ``||mean g||^2 / mean ||g||^2`` and the gradient covariance trace;
* :func:`empirical_fisher_diagonal`: exact mean of squared per-example gradients (true or sampled labels).

Kernel-backed pieces: ``regops::valuation_cross_gram`` and ``regops::valuation_sq_grad_sum``
(reference :mod:`regops.reference.valuation`, Triton ``regops.kernels.valuation``).
"""

from __future__ import annotations

from regops.valuation.dots import per_sample_grad_dots
from regops.valuation.fisher import empirical_fisher_diagonal
from regops.valuation.ops import cross_gram_dots as cross_gram_dots
from regops.valuation.ops import sq_grad_sum as sq_grad_sum
from regops.valuation.scores import GradientCoherence, data_scores, gradient_coherence
from regops.valuation.tracin import TracInTopK, tracin

__all__ = [
    "GradientCoherence",
    "TracInTopK",
    "data_scores",
    "empirical_fisher_diagonal",
    "gradient_coherence",
    "per_sample_grad_dots",
    "tracin",
]
