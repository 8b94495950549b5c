"""Hessian estimates: Hutchinson trace and diagonal, Hutch++, XTrace, batched Philox probes, exact head curvature,
exact Gauss-Newton, and a differentiable trace penalty.

The public path is ``regops.hessian.<function>``:

* `trace` / `diagonal` -- stochastic estimates of ``tr(H)`` / ``diag(H)`` of a loss (a function of
  tensors, a model with a criterion and a batch, or a DataLoader), with standard errors, early stopping,
  per-parameter and per-module traces, batched Hessian-vector products and distributed probes.
* `probes` -- the Philox probes (Rademacher or Gaussian) all estimators use, reproducible from a seed.
* `linear_head_diagonal` / `linear_head_trace` -- exact, one pass, for a softmax cross-entropy head.
* `ggn_trace` / `ggn_diagonal` -- the exact generalised Gauss-Newton trace (one forward and C
  backward passes through the per-example squared-norm machinery of the grad-norms family) and diagonal, and
  their one-pass Monte-Carlo versions (labels sampled from the model, as Sophia-G).
* `trace_penalty` -- a differentiable estimate to add to a training loss.
* `HessianLinearOperator` -- ``H @ v`` on the same engines (curvlinops-style), for your own probes and
  algorithms; `trace` / `diagonal` also take ``probes=``.
* `twice_differentiable` -- the context the estimators run forwards under (attention on its math backend,
  which has a double backward), for your own ``create_graph`` backwards.

Hessian-vector products (``hvp=``): batched double backward, forward-over-reverse, a loop, or central finite
differences for models with no double backward. Frozen params are left out in every form,
params of different dtypes keep their own precision, and dropout in train mode is held at one fixed mask per
batch for every probe and engine.

Layout: ``api`` (the public functions), ``ops`` (the two operators: ``regops::hessian_probes`` and the fused
accumulation ``regops::hessian_probe_dot``), ``reference`` (their pure-PyTorch references), ``triton`` (their
launchers; kernels in `regops.kernels.hessian`), ``dtensor`` (FSDP2), and the engines: ``_probes`` (the
parameters as one probe buffer), ``_hvp`` (Hessian-vector products), ``_hutchinson``, ``_sketch`` (Hutch++,
XTrace), ``_results``, ``_ggn``, ``_linop``, ``_context`` (SDPA backend, loss rewrites, fixed RNG), ``_inputs``
(params and call forms).
"""

from regops.hessian.api import *  # noqa: F403
from regops.hessian.api import __all__ as __all__
