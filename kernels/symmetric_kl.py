"""Triton symmetric KL between two logit tensors (R-Drop consistency): one row per program, streaming the vocab.

Forward: pass 1 online max / sum-exp for both rows, pass 2 the loss and <p_a, d>, <p_b, d> (d = log p_a - log p_b);
saves 4 floats per row. Backward: one pass writing both gradients. Nothing of size rows x V besides the inputs
and the gradients is ever allocated. Launchers: :mod:`regops.losses.triton`.
"""

import triton
import triton.language as tl
from regops.kernels.utils import cast_rne


@triton.jit(do_not_specialize=["cols"])
def symmetric_kl_fwd_kernel(a_ptr, b_ptr, loss_ptr, stats_ptr, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * cols
    b_row = b_ptr + row * cols
    compute = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.arange(0, BLOCK)
    m_a = tl.full([BLOCK], float("-inf"), compute)
    m_b = tl.full([BLOCK], float("-inf"), compute)
    s_a = tl.zeros([BLOCK], compute)
    s_b = tl.zeros([BLOCK], compute)
    for start in range(0, cols, BLOCK):
        ok = start + offs < cols
        a = tl.load(a_row + start + offs, mask=ok, other=float("-inf")).to(compute)
        b = tl.load(b_row + start + offs, mask=ok, other=float("-inf")).to(compute)
        new_a = tl.maximum(m_a, a)
        new_b = tl.maximum(m_b, b)
        # Lanes that have seen only -inf keep sum 0 (avoid exp(-inf - -inf) = nan).
        s_a = tl.where(new_a == float("-inf"), 0.0, s_a * tl.exp(m_a - new_a) + tl.exp(a - new_a))
        s_b = tl.where(new_b == float("-inf"), 0.0, s_b * tl.exp(m_b - new_b) + tl.exp(b - new_b))
        m_a, m_b = new_a, new_b
    row_max_a = tl.max(m_a, axis=0)
    row_max_b = tl.max(m_b, axis=0)
    lse_a = row_max_a + tl.log(tl.sum(tl.where(m_a == float("-inf"), 0.0, s_a * tl.exp(m_a - row_max_a)), axis=0))
    lse_b = row_max_b + tl.log(tl.sum(tl.where(m_b == float("-inf"), 0.0, s_b * tl.exp(m_b - row_max_b)), axis=0))
    acc_loss = tl.zeros([BLOCK], compute)
    acc_pad = tl.zeros([BLOCK], compute)
    acc_pbd = tl.zeros([BLOCK], compute)
    for start in range(0, cols, BLOCK):
        ok = start + offs < cols
        la = tl.load(a_row + start + offs, mask=ok, other=0.0).to(compute) - lse_a
        lb = tl.load(b_row + start + offs, mask=ok, other=0.0).to(compute) - lse_b
        pa = tl.exp(la)
        pb = tl.exp(lb)
        d = la - lb
        acc_loss += tl.where(ok, (pa - pb) * d, 0.0)
        acc_pad += tl.where(ok, pa * d, 0.0)
        acc_pbd += tl.where(ok, pb * d, 0.0)
    tl.store(loss_ptr + row, 0.5 * tl.sum(acc_loss, axis=0))
    tl.store(stats_ptr + 4 * row, lse_a)
    tl.store(stats_ptr + 4 * row + 1, lse_b)
    tl.store(stats_ptr + 4 * row + 2, tl.sum(acc_pad, axis=0))
    tl.store(stats_ptr + 4 * row + 3, tl.sum(acc_pbd, axis=0))


@triton.jit(do_not_specialize=["cols"])
def symmetric_kl_bwd_kernel(grad_ptr, a_ptr, b_ptr, stats_ptr, ga_ptr, gb_ptr, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    compute = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    g = 0.5 * tl.load(grad_ptr + row).to(compute)
    lse_a = tl.load(stats_ptr + 4 * row).to(compute)
    lse_b = tl.load(stats_ptr + 4 * row + 1).to(compute)
    pad = tl.load(stats_ptr + 4 * row + 2).to(compute)
    pbd = tl.load(stats_ptr + 4 * row + 3).to(compute)
    offs = tl.arange(0, BLOCK)
    for start in range(0, cols, BLOCK):
        idx = row * cols + start + offs
        ok = start + offs < cols
        la = tl.load(a_ptr + idx, mask=ok, other=0.0).to(compute) - lse_a
        lb = tl.load(b_ptr + idx, mask=ok, other=0.0).to(compute) - lse_b
        pa = tl.exp(la)
        pb = tl.exp(lb)
        d = la - lb
        ga = g * (pa * (d - pad) + pa - pb)
        gb = g * (pb * (pbd - d) + pb - pa)
        tl.store(ga_ptr + idx, cast_rne(ga, ga_ptr.dtype.element_ty), mask=ok)
        tl.store(gb_ptr + idx, cast_rne(gb, gb_ptr.dtype.element_ty), mask=ok)


_DTYPES = ("*fp32", "*fp16", "*bf16", "*fp64")
COMPILE_SPECS = []
for _t in _DTYPES:
    _acc = "*fp64" if _t == "*fp64" else "*fp32"
    COMPILE_SPECS += [
        (
            symmetric_kl_fwd_kernel,
            {"a_ptr": _t, "b_ptr": _t, "loss_ptr": _acc, "stats_ptr": _acc, "cols": "i64"},
            {"BLOCK": 4096},
        ),
        (
            symmetric_kl_bwd_kernel,
            {"grad_ptr": _acc, "a_ptr": _t, "b_ptr": _t, "stats_ptr": _acc, "ga_ptr": _t, "gb_ptr": _t, "cols": "i64"},
            {"BLOCK": 4096},
        ),
    ]
