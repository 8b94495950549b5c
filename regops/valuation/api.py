"""The valuation family's public functions and result classes."""

from __future__ import annotations

from regops.valuation._dots import per_sample_grad_dots
from regops.valuation._fisher import empirical_fisher_diagonal
from regops.valuation._scores import GradientCoherence, data_scores, gradient_coherence
from regops.valuation._tracin import TracInTopK, tracin

__all__ = [
    "GradientCoherence",
    "TracInTopK",
    "data_scores",
    "empirical_fisher_diagonal",
    "gradient_coherence",
    "per_sample_grad_dots",
    "tracin",
]
