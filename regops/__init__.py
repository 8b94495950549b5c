"""regops: fused, memory-light regularization ops for PyTorch.

Importing regops registers its torch.library operators; it never initialises CUDA, imports Triton or loads
the CUDA extension (those happen on the first op that needs them).
"""

from regops import dropout as _dropout_module
from regops import grad_norms as _grad_norms_module
from regops import hessian, merge, nn, optim
from regops import losses as _losses_module
from regops import masks as _masks_module
from regops import mix as _mix_module
from regops import penalties as _penalties_module
from regops import per_example as _per_example_module
from regops import privacy as _privacy_module
from regops import valuation as _valuation_module
from regops._core.dispatch import BackendUnavailableError, use_backend
from regops._core.extension import build_extension
from regops._version import __version__
from regops.dropout import *  # noqa: F403
from regops.grad_norms import *  # noqa: F403
from regops.losses import *  # noqa: F403
from regops.masks import *  # noqa: F403
from regops.mix import *  # noqa: F403
from regops.patch import PatchHandle, patch
from regops.penalties import *  # noqa: F403
from regops.privacy import DPDataLoader, PrivacyEngine
from regops.valuation import *  # noqa: F403

__all__ = [
    "BackendUnavailableError",
    "__version__",
    "build_extension",
    "PatchHandle",
    "DPDataLoader",
    "PrivacyEngine",
    "hessian",
    "merge",
    "nn",
    "optim",
    "patch",
    "use_backend",
    *_dropout_module.__all__,
    *_mix_module.__all__,
    *_grad_norms_module.__all__,
    *_losses_module.__all__,
    *_valuation_module.__all__,
    *_masks_module.__all__,
    *_penalties_module.__all__,
]


def _name_public_paths() -> None:
    """help(), tracebacks and the API reference name the path a user writes (``regops.dropout``,
    ``regops.hessian.trace``), not the private module an object is defined in."""
    import inspect
    import re
    import sys

    private = re.compile(r"regops\.(_core|\w+\.(api|_\w+))(\.|$)")
    for module in (sys.modules[__name__], nn, hessian, optim, merge, _privacy_module, _per_example_module):
        for name in module.__all__:
            obj = getattr(module, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and private.match(obj.__module__ or ""):
                obj.__module__ = module.__name__


_name_public_paths()
