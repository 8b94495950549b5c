"""The mix family: MixUp and CutMix with device-side draws and one mixing op for every mode.

* Draws and parameters: every random number is drawn with torch on the input's
  device, then turned into per-sample parameters (`MixParams`) following timm's ``Mixup`` (or
  torchvision's v2 ``MixUp``/``CutMix``) rule by rule, vectorised, with no host sync.
* One mixing op, ``regops::mix_apply`` (`regops.mix.ops`): blend outside the box, paste inside it, in a single
  pass for every mode; differentiable (manifold mixup), its backward the same pass transposed.
* The losses that work from the index labels a `MixedBatch` keeps are in `regops.losses`.
"""

from regops.mix.api import *  # noqa: F403
from regops.mix.api import __all__ as _api_all
from regops.mix.nn import CutMix, MixUp

__all__ = [*_api_all, "CutMix", "MixUp"]
