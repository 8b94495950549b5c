"""DP-SGD for an existing training loop, with Opacus's interface: `PrivacyEngine` wraps the model, the
optimizer and the data loader (Poisson batches, empty ones included); the loop stays
``loss.backward(); optimizer.step()`` and runs regops' one-backward clipping (`regops.dp_clipping`), noise
from a ``torch.Generator``, Opacus's accountants, virtual steps (`BatchMemoryManager`), autocast, DDP and
FSDP2."""

from regops.privacy.api import *  # noqa: F403
from regops.privacy.api import __all__ as __all__
