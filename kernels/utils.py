"""Small Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def cast_rne(y, dtype: tl.constexpr):
    """Round ``y`` to ``dtype`` to nearest even, bit-identical to torch's ``.to(dtype)``.

    bfloat16 is rounded with integer arithmetic: the GPU's conversion is round-to-nearest-even, but the Triton
    interpreter truncates, and the interpreter is what checks these kernels against the reference on CPU.
    """
    if dtype == tl.bfloat16:
        y = y.to(tl.float32)
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y == y, rounded, 0x7FC0)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)
