"""The per-example engine shared by `regops.grad_norms` and `regops.valuation`.

It records every forward use of a model's trainable parameters and turns the ordinary backward pass into
per-example quantities without building the ``B x P`` per-example gradients where an exact cheaper form exists:

* modules with a rule (Linear, Conv, Embedding, the norms, registered rules: `register_rule`) are seen by
  forward hooks, which keep the layer's input and hook its output's gradient;
* every other use of a trainable parameter is seen op by op by a ``TorchFunctionMode`` active during the block;
* a rule turns (saved input, output gradient) into per-example squared norms (ghost or instantiate forms, the
  ``regops::grad_norms_*`` operators), per-example gradients, weighted gradient sums (DP clipping by
  Book-Keeping) and inner products between examples of two batches (``regops::valuation_*``).
"""

from regops.per_example.api import *  # noqa: F403
from regops.per_example.api import __all__ as __all__  # noqa: F401
