"""What each torch function does to the examples' place: the tracker's table.

Functions are classified by their aten name (the Python name of ``torch.X``, ``Tensor.X``, ``F.X``; dunders mapped to
their op): pointwise ops broadcast their inputs, views and indexing move dims, reductions and scans remove or read
along dims, matrix products contract one dim, row ops (convolutions, pooling, norms) treat the leading dim as
independent rows. A function outside the table has an unknown effect: its result carries no known layout, and a
parameter meeting such a result sends the micro-batch to the exact ``torch.func`` path.
"""

from __future__ import annotations

from collections.abc import Callable

from regops.per_example._recipes import op_name

POINTWISE = frozenset(
    """abs acos acosh add addcdiv addcmul angle asin asinh atan atan2 atanh bitwise_and bitwise_left_shift bitwise_not
    bitwise_or bitwise_right_shift bitwise_xor ceil celu clamp clamp_max clamp_min clip clone conj_physical copysign
    cos cosh deg2rad digamma div divide elu eq erf erfc erfinv exp exp2 expm1 float_power floor floor_divide fmax fmin
    fmod frac gcd ge gelu gt hardshrink hardsigmoid hardswish hardtanh heaviside hypot i0 igamma igammac isfinite isinf
    isnan isneginf isposinf lcm ldexp le leaky_relu lerp lgamma log log10 log1p log2 logaddexp logaddexp2 logical_and
    logical_not logical_or logical_xor logit lt masked_fill maximum minimum mish mul multiply mvlgamma nan_to_num ne
    neg negative nextafter polygamma positive pow rad2deg reciprocal relu relu6 remainder round rsqrt rsub selu sgn
    sigmoid sign signbit silu sin sinc sinh softplus softshrink sqrt square sub subtract tan tanh threshold true_divide
    trunc where xlogy dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d rrelu glu_pointwise
    to float double half bfloat16 long int short bool byte char type type_as contiguous detach requires_grad_
    cpu cuda logsigmoid tanhshrink softsign prelu erfinv_ sigmoid_ gelu_ relu_ fill_ zero_ copy_ masked_fill_ clamp_
    lerp_ data rdiv rpow rfloor_divide rremainder""".split()
)
# Element-wise in every input, but the named argument's dims are read as a whole (dropout2d: whole channels).
DIM_READERS = {
    "softmax": ("dim", 1, None), "log_softmax": ("dim", 1, None), "softmin": ("dim", 1, None),
    "cumsum": ("dim", 1, None), "cumprod": ("dim", 1, None), "cummax": ("dim", 1, None), "cummin": ("dim", 1, None),
    "logcumsumexp": ("dim", 1, None), "sort": ("dim", 1, -1), "argsort": ("dim", 1, -1), "flip": ("dims", 1, None),
    "roll": ("dims", 2, None), "normalize": ("dim", 2, 1), "glu": ("dim", 1, -1), "topk": ("dim", 2, -1),
    "kthvalue": ("dim", 2, -1), "diff": ("dim", 2, -1),
}  # fmt: skip
# The arguments of these ops that are indices: their values are read, their own examples do not move the data's.
INDEXED = frozenset({"index_select", "gather", "take_along_dim", "__getitem__", "_pack_padded_sequence",
                     "_pad_packed_sequence", "embedding"})  # fmt: skip
REDUCTIONS = frozenset(
    """sum mean amax amin max min prod norm logsumexp var std all any argmax argmin count_nonzero nansum nanmean
    median nanmedian var_mean std_mean vector_norm""".split()
)
VIEWS = frozenset(
    """view reshape flatten unflatten view_as reshape_as expand expand_as broadcast_to squeeze unsqueeze permute
    transpose t T mT movedim moveaxis swapaxes swapdims narrow select __getitem__ split chunk unbind tensor_split
    split_with_sizes repeat tile index_select gather take_along_dim""".split()
)
MATMULS = frozenset({"matmul", "mm", "bmm", "einsum", "linear", "addmm", "baddbmm", "addbmm"})
# The leading dim holds independent rows: the examples may sit there in any arrangement.
ROWS = frozenset(
    """conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d max_pool1d max_pool2d max_pool3d
    avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
    adaptive_max_pool2d adaptive_max_pool3d lp_pool1d lp_pool2d interpolate upsample pixel_shuffle pixel_unshuffle
    group_norm instance_norm local_response_norm unfold fold max_pool2d_with_indices channel_shuffle
    native_channel_shuffle""".split()
)
# Functions of no tensor data (shape queries, metadata): nothing to follow.
META = frozenset(
    """size dim ndimension numel shape dtype device is_contiguous is_floating_point element_size stride storage_offset
    data_ptr __len__ __format__ __repr__ __bool__ __int__ __float__ __index__ item tolist nelement is_complex
    requires_grad grad_fn is_leaf names layout is_cuda is_sparse get_device untyped_storage _version __hash__
    ndim itemsize nbytes __contains__ __iter__ __array__ _is_view register_hook retain_grad
    register_post_accumulate_grad_hook""".split()
)
CREATION = frozenset(
    """zeros ones empty full arange linspace logspace eye tensor as_tensor zeros_like ones_like empty_like full_like
    rand randn randint rand_like randn_like randint_like new_zeros new_ones new_empty new_full new_tensor
    randperm tril_indices triu_indices scalar_tensor""".split()
)

_DUNDERS = {
    "__add__": "add", "__radd__": "add", "__iadd__": "add_", "__sub__": "sub", "__rsub__": "rsub",
    "__isub__": "sub_", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul_", "__truediv__": "div",
    "__rtruediv__": "rdiv", "__rdiv__": "rdiv", "__itruediv__": "div_", "__floordiv__": "floor_divide",
    "__rfloordiv__": "rfloor_divide", "__mod__": "remainder", "__rmod__": "rremainder", "__pow__": "pow",
    "__rpow__": "rpow", "__ipow__": "pow_", "__neg__": "neg", "__pos__": "positive", "__abs__": "abs",
    "__and__": "bitwise_and", "__rand__": "bitwise_and", "__or__": "bitwise_or", "__ror__": "bitwise_or",
    "__xor__": "bitwise_xor", "__rxor__": "bitwise_xor", "__invert__": "bitwise_not", "__lt__": "lt",
    "__le__": "le", "__gt__": "gt", "__ge__": "ge", "__eq__": "eq", "__ne__": "ne", "__matmul__": "matmul",
    "__rmatmul__": "rmatmul", "__iand__": "bitwise_and_", "__ior__": "bitwise_or_", "__getitem__": "__getitem__",
    "__setitem__": "__setitem__",
}  # fmt: skip
# Right-hand forms: their first argument is the right operand.
REFLECTED = frozenset({"rsub", "rdiv", "rfloor_divide", "rremainder", "rpow"})


def canonical(func: Callable) -> str:
    """The op name of a torch function: ``Tensor.__radd__`` -> ``add``, ``F.gelu`` -> ``gelu``."""
    name = op_name(func)
    return _DUNDERS.get(name, name)


def in_place(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_") and name[:-1] in POINTWISE | {"add", "sub", "mul", "div"}


def fname(func: Callable) -> str:
    """How a user wrote the function: ``F.linear``, ``Tensor.mul``, ``torch.einsum``."""
    module = getattr(func, "__module__", None) or ""
    name = canonical(func)
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"F.{name}"
    return f"Tensor.{name}" if "Tensor" in str(getattr(func, "__qualname__", "")) else f"torch.{name}"


# Ops whose tensor arguments broadcast against the result (a node argument is expanded along the examples' dim).
BROADCASTING = POINTWISE | frozenset({"add_", "sub_", "mul_", "div_"})
