"""The penalties family's modules: an activation with its sparsity penalty fused into backward."""

from __future__ import annotations

import torch

from regops._core.modules import RuntimeProbability
from regops.penalties import api

__all__ = ["ReLUL1"]


class ReLUL1(RuntimeProbability, torch.nn.Module):
    """`regops.relu_l1` as a module: ReLU / ReLU^2 / FATReLU whose backward adds ``l1``'s L1 gradient.

    ``l1`` is a runtime value under ``torch.compile`` (``module.l1 = new`` between steps never recompiles). In
    eval mode the penalty is off (plain activation). With ``track_stats`` the last training call's
    `regops.ReLUL1Stats` are kept in ``last_stats``.

    Args:
        l1: the penalty weight, >= 0 (may change between steps).
        squared: ReLU^2.
        threshold: FATReLU's threshold (0: ReLU).
        track_stats: keep the last training call's statistics in ``last_stats``.

    Example::

        >>> act, up = regops.nn.ReLUL1(l1=1e-5, track_stats=True), torch.nn.Linear(16, 64)
        >>> h = act(up(torch.randn(8, 16)))
        >>> act.last_stats.unit_active.shape
        torch.Size([64])
    """

    _p_attr = "l1"

    def __init__(self, l1: float = 0.0, squared: bool = False, threshold: float = 0.0, track_stats: bool = False):
        super().__init__()
        self.l1, self.squared, self.threshold, self.track_stats = l1, squared, threshold, track_stats
        self.last_stats: api.ReLUL1Stats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l1 = self._probability() if self.training else 0.0
        stats = self.track_stats and self.training
        out = api.relu_l1(x, l1, squared=self.squared, threshold=self.threshold, return_stats=stats)
        if stats:
            out, self.last_stats = out
        return out

    def extra_repr(self) -> str:
        return f"l1={self.l1}, squared={self.squared}, threshold={self.threshold}"
