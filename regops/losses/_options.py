"""The scalar options of the regularized cross-entropy ops, as one structure.

The public functions build a :class:`LossOptions` once from the user's arguments; the ops take it as one
``float[] options`` argument (:meth:`LossOptions.values`, in field order), and every backend reads it back with
:meth:`LossOptions.of`. A new option is a new field here (and its math in the reference and the kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LossOptions:
    """Regularizers and the logit transform of one cross-entropy call (see :mod:`regops.losses.reference`).

    Attributes:
        smoothing: label smoothing ``a`` in ``[0, 1]``.
        maxsup: MaxSup weight ``m``.
        z_loss: z-loss weight ``l``.
        confidence: confidence-penalty weight ``b``.
        decoupled: decoupled-mixup weight ``eta`` (mixed pairs only).
        softcap: ``c`` of ``c tanh(s x / c)``; 0 for no cap.
        scale: the logit scale ``s``.
    """

    smoothing: float = 0.0
    maxsup: float = 0.0
    z_loss: float = 0.0
    confidence: float = 0.0
    decoupled: float = 0.0
    softcap: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        # formed once: the public functions pass it on every call (dataclasses.astuple deep-copies: slow per call)
        object.__setattr__(self, "_values", tuple(self.__dict__.values()))

    def values(self) -> tuple[float, ...]:
        """The ``float[] options`` argument of the ops (the fields in order)."""
        return self._values

    @classmethod
    def of(cls, values: Sequence[float]) -> LossOptions:
        """The options an op was called with."""
        return cls(*values)
