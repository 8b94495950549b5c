"""Multi-sample dropout: the mean of K dropout masks applied in one pass, and the seeds of its K masks."""

from __future__ import annotations

import torch

from regops._core import rng, validate
from regops._core.validate import is_dtensor, runtime_probability
from regops.dropout import ops
from regops.dropout import reference as ref


def multi_sample_seeds(
    x: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One seed for a ``num_samples``-mask call on ``x`` and the per-sample seeds it implies.

    Sample ``k`` uses first counter ``offset + k * ceil(numel / 4)``: its mask is :func:`regops.dropout`'s for
    that seed, and the mean of the ``k`` masks is what :func:`multi_sample_dropout` applies.
    """
    step = ref.multi_sample_counters(x.numel())
    seed = rng.philox_seed(x.device, num_samples * 4 * step, generator)
    per_sample = [seed + torch.tensor([0, k * step], device=seed.device) for k in range(num_samples)]
    return seed, per_sample


def multi_sample_dropout(
    x: torch.Tensor,
    p: float,
    num_samples: int,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``x * mean_k(m_k) / (1-p)``: the mean of ``num_samples`` dropout masks applied in one pass.

    For a linear head ``W``, ``mean_k W(dropout_k(x)) = W(multi_sample_dropout(x))``: multi-sample dropout
    (Inoue 2019) without materializing K masked copies. The K masks are regenerated in backward. NaN/Inf as
    torch's ``mean_k(dropout_k(x))``: NaN where some sample dropped a NaN or Inf.

    Args:
        x, p, training, generator: as `regops.dropout`. num_samples: ``K``, the masks averaged.
    Returns:
        Tensor of ``x``'s shape and dtype.

    Example::

        >>> head, features = torch.nn.Linear(16, 3), torch.randn(4, 16)
        >>> logits = head(regops.multi_sample_dropout(features, 0.5, num_samples=8))
        >>> logits.shape
        torch.Size([4, 3])
    """
    validate.floating(x, "x")
    p_value, p_t = runtime_probability(p)
    rng.check_generator(generator, x.device)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"regops: num_samples must be a positive int, got {num_samples!r}")
    validate.flag(training, "training")
    if not training or p_value == 0.0:
        return x
    if is_dtensor(x):
        from regops.dropout import dtensor

        return dtensor.multi_sample_dropout(x, p_value, num_samples, generator)
    seed, _ = multi_sample_seeds(x, num_samples, generator)
    return ops.multi_sample_dropout_mean(x, p_t, num_samples, seed)
