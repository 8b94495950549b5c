"""The optim family's operators: multi-tensor ops over lists of parameters, each declared once.

Every op takes ``Tensor[]`` lists (one entry per parameter, any mix of sizes) and runs as one pass: the C++ CPU kernel
loops over the list with ``at::parallel_for``, the Triton kernel is one launch per dtype over a table of pointers.
Hyper-parameters, step counts, the seed, ``grad_scale`` and ``found_inf`` are tensors read where the kernel runs, so
that neither ``torch.compile`` nor a CUDA graph freezes a value. References: :mod:`regops.optim.reference`;
Triton launchers: :mod:`regops.optim.triton`; C++ kernels: csrc/optim/.
"""

from __future__ import annotations

from regops._core.dtypes import acc_dtype
from regops._core.ops import declare
from regops.optim import reference as ref

TRITON = "regops.optim.triton:"


def _dots_fake(a, b, w, rows):
    n = sum(ref.rows_of(x) for x in a) if rows else len(a)
    return a[0].new_empty((n, 3), dtype=acc_dtype(*a, *b, *w))


def _nothing(*args) -> None:
    return None


dots = declare(
    "optim_dots(Tensor[] a, Tensor[] b, Tensor[] w, bool rows) -> Tensor",
    reference=ref.dots,
    triton=TRITON + "dots",
    fake=_dots_fake,
    contiguous=False,
)

sam_perturb = declare(
    "optim_sam_perturb(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] old_params, Tensor(c!)[] old_grads, "
    "Tensor scales, bool adaptive, Tensor? found_inf) -> ()",
    reference=ref.sam_perturb,
    triton=TRITON + "sam_perturb",
    fake=_nothing,
    contiguous=False,
)

axpby = declare(
    "optim_axpby(Tensor(a!)[] y, Tensor[] x, Tensor coeffs) -> ()",
    reference=ref.axpby,
    triton=TRITON + "axpby",
    fake=_nothing,
    contiguous=False,
)

step = declare(
    "optim_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, "
    "Tensor(d!)[] state3, Tensor(e!)[] steps, Tensor(f!)[] ema, Tensor[] anchors, Tensor[] fishers, "
    "Tensor[] restore, Tensor? row_scales, Tensor hyper, int[] param_ids, int[] elem_offsets, str method, "
    "str decay, bool maximize, bool clip, Tensor? seed, Tensor? grad_scale, Tensor? found_inf) -> ()",
    reference=ref.optim_step,
    triton=TRITON + "optim_step",
    fake=_nothing,
    contiguous=False,
)

__all__ = ["axpby", "dots", "sam_perturb", "step"]
