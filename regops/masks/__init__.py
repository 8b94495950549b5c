"""The masks family: masks on adapters and parameters. LoRA dropout applies `regops.dropout`'s mask while
the adapter's input is multiplied (no dropped copy, only a seed saved)."""

from regops.masks.api import *  # noqa: F403
from regops.masks.api import __all__ as __all__
