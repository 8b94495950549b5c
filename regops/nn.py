"""Drop-in modules of every family (re-exported from each family's ``nn`` module). Each declares the torch (or
third-party) module it can replace, for `regops.patch`."""

from __future__ import annotations

from regops.dropout.nn import *  # noqa: F403
from regops.dropout.nn import __all__ as _dropout_all
from regops.losses.nn import *  # noqa: F403
from regops.losses.nn import __all__ as _losses_all
from regops.masks.nn import *  # noqa: F403
from regops.masks.nn import __all__ as _masks_all
from regops.mix.nn import *  # noqa: F403
from regops.mix.nn import __all__ as _mix_all
from regops.penalties.nn import *  # noqa: F403
from regops.penalties.nn import __all__ as _penalties_all

__all__ = [*_dropout_all, *_losses_all, *_masks_all, *_mix_all, *_penalties_all]
