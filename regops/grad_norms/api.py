"""The grad_norms family's public functions and classes: per-example gradient norms from the ordinary backward pass,
DP-SGD clipping by Book-Keeping (one backward), Poisson sampling, privacy accounting and the BatchNorm fix."""

from __future__ import annotations

# regops.grad_norms.{epsilon, noise_multiplier_for, Change, per_sample_squared_norms} are public too, but not
# re-exported at regops' top level (__all__).
from regops.grad_norms._accounting import PrivacyAccountant
from regops.grad_norms._accounting import epsilon as epsilon
from regops.grad_norms._accounting import noise_multiplier_for as noise_multiplier_for
from regops.grad_norms._clipping import DPClipping, clip_per_sample_, dp_clipping
from regops.grad_norms._fix import Change as Change
from regops.grad_norms._fix import fix_model
from regops.grad_norms._norms import PerSampleGradNorms, per_sample_grad_norms
from regops.grad_norms._norms import per_sample_squared_norms as per_sample_squared_norms
from regops.grad_norms._sampling import PoissonBatchSampler

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
