"""The hessian family's operators: schemas, fakes, backends and derivatives, each declared once.

``regops::hessian_probes`` draws probe rows for all parameters at once (one kernel launch on a GPU) into a
``[K, S]`` buffer on the seed's device (``S >= N``, the parameters' numels concatenated and rounded up to whole
Philox counters). It has no floating tensor input: it dispatches on its seed tensor's device.
``regops::hessian_probe_dot`` reduces ``v`` and ``Hv`` in one pass to the per-parameter, per-probe ``v . Hv``
(traces) and the per-coordinate sums of ``v * Hv`` and its square (diagonal and its standard error).
References: :mod:`regops.hessian.reference`; Triton launchers: :mod:`regops.hessian.triton`; C++ kernels:
csrc/hessian/.
"""

from __future__ import annotations

import torch

from regops._core.dtypes import acc_dtype
from regops._core.ops import declare
from regops.hessian import reference as ref

TRITON = "regops.hessian.triton:"


def _probes_fake(seed, first_probe, num_probes, numel, distribution, dtype):
    return torch.empty(num_probes, ref.row_stride(numel, distribution), dtype=dtype, device=seed.device)


hessian_probes = declare(
    "hessian_probes(Tensor seed, int first_probe, int num_probes, int numel, str distribution, ScalarType dtype) "
    "-> Tensor",
    reference=ref.probes,
    triton=TRITON + "probes",
    fake=_probes_fake,
)


def _stream_add(out, seed, start, scale, distribution):
    # Elements start .. start + n - 1 of probe row 0 of `seed`, drawn in float32, scaled in float32, rounded to out's
    # dtype and added in it.
    shifted, lead = ref.stream_start(seed, start, distribution)
    n = out.numel()
    noise = hessian_probes(shifted, 0, 1, lead + n, distribution, torch.float32)[0, lead : lead + n].mul_(scale)
    out.view(-1).add_(noise.to(out.dtype))


# out (contiguous) += scale * elements start .. start + out.numel() - 1 of the probe stream's row 0: the DP noise
# of one parameter or of a run of its shard. The C++ CPU kernel draws and adds in one pass, with no buffer.
hessian_stream_add_ = declare(
    "hessian_stream_add_(Tensor(a!) out, Tensor seed, int start, float scale, str distribution) -> ()",
    reference=_stream_add,
    fake=lambda out, seed, start, scale, distribution: None,
    composite=True,
    contiguous=False,
)


def _probe_dot_fake(vs, hvs, with_diag):
    acc = acc_dtype(vs[0])
    k = vs[0].shape[0]
    n = sum(v.numel() // k for v in vs) if k else 0
    return (
        vs[0].new_empty(k, len(vs), dtype=acc),
        vs[0].new_empty(n if with_diag else 0, dtype=acc),
        vs[0].new_empty(n if with_diag else 0, dtype=acc),
    )


hessian_probe_dot = declare(
    "hessian_probe_dot(Tensor[] vs, Tensor[] hvs, bool with_diag) -> (Tensor, Tensor, Tensor)",
    reference=ref.probe_dot,
    triton=TRITON + "probe_dot",
    fake=_probe_dot_fake,
    # The probes are column blocks of one [K, S] buffer: the kernels read them in place through their row
    # strides (a contiguous copy per call would also defeat the Triton launcher's index tables under CUDA graphs).
    contiguous=False,
)


def _dot_setup(ctx, inputs, output) -> None:
    vs, hvs, with_diag = inputs
    ctx.with_diag = with_diag
    ctx.save_for_backward(*vs, *hvs)


def _dot_backward(ctx, g_dots, g_diag, g_sq):
    saved = ctx.saved_tensors
    p = len(saved) // 2
    vs, hvs = saved[:p], saved[p:]
    acc = acc_dtype(vs[0])
    k = vs[0].shape[0]
    grads_v, grads_hv = [], []
    offset = 0
    for i, (v, hv) in enumerate(zip(vs, hvs, strict=True)):
        vf, hf = v.reshape(k, -1).to(acc), hv.reshape(k, -1).to(acc)
        n = vf.shape[1]
        # d(outputs)/d(v_kj hv_kj) = g_dots[k, i] + g_diag[j] + 2 (v_kj hv_kj) g_sq[j]
        upstream = torch.zeros_like(vf)
        if g_dots is not None:
            upstream = upstream + g_dots[:, i : i + 1].to(acc)
        if ctx.with_diag and g_diag is not None:
            upstream = upstream + g_diag[offset : offset + n].to(acc)
        if ctx.with_diag and g_sq is not None:
            upstream = upstream + 2.0 * vf * hf * g_sq[offset : offset + n].to(acc)
        offset += n
        grads_v.append((upstream * hf).reshape(v.shape).to(v.dtype))
        grads_hv.append((upstream * vf).reshape(hv.shape).to(hv.dtype))
    return grads_v, grads_hv, None


hessian_probe_dot.register_autograd(_dot_backward, setup_context=_dot_setup)
