"""R-Drop's consistency loss moved to the losses family (:mod:`regops.losses.consistency`); this path stays."""

from regops.losses.consistency import symmetric_kl

__all__ = ["symmetric_kl"]
