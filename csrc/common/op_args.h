// The arguments every regops op kernel reads the same way (CPU and CUDA bindings alike): p as a one-element
// tensor (a runtime value under torch.compile), the int64 [2] Philox seed tensor, and the output's memory format.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace regops {

// The value of an op's p tensor, range-checked (ValueError): under torch.compile this is the only check.
inline double probability(const at::Tensor& p, const char* op) {
  TORCH_CHECK(p.numel() == 1 && at::isFloatingType(p.scalar_type()), "regops::", op,
              ": p must be a one-element floating tensor, got ", p.scalar_type(), " ", p.sizes());
  const double v = (p.device().is_cpu() && p.scalar_type() == at::kDouble) ? *p.const_data_ptr<double>()
                                                                          : p.item<double>();
  TORCH_CHECK_VALUE(v >= 0.0 && v <= 1.0, "regops: p must be in [0, 1], got ", v);
  return v;
}

// regops._core.philox.keep_threshold: int(p * 2**31) - 1 (the product is exact in double).
inline int32_t keep_threshold(double p) { return static_cast<int32_t>(static_cast<int64_t>(p * 2147483648.0) - 1); }

// regops.dropout.reference.dropout_scale: 1/(1-p) rounded to float32; 0 for p >= 1.
inline float dropout_scale(double p) { return p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - p)); }

inline void check_seed(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2 && seed.is_contiguous(), "regops::", op,
              ": seed must be a contiguous int64 tensor of 2 elements");
}

// (key, first counter) of a seed tensor read on the host: the CPU kernels' view of the stream.
struct HostSeed {
  int64_t key, offset;
};
inline HostSeed host_seed(const at::Tensor& seed, const char* op) {
  check_seed(seed, op);
  const at::Tensor s = seed.device().is_cpu() ? seed : seed.cpu();
  const int64_t* v = s.const_data_ptr<int64_t>();
  return {v[0], v[1]};
}

// Whether t is one value seen at every index (stride 0 wherever the size is not 1): the gradient that .sum() and
// .mean() hand back. The CPU kernels read such an operand as one row of that value instead of copying it out.
inline bool is_broadcast_value(const at::Tensor& t) {
  if (t.numel() <= 1) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != 0) return false;
  }
  return true;
}

// y (contiguous, x's shape) laid out like x: channels_last in, channels_last out (regops._core.ops.in_layout_of).
// A broadcast value has no layout of its own: torch's empty_like gives it contiguous strides.
inline at::Tensor in_layout_of(const at::Tensor& x, const at::Tensor& y) {
  if (x.is_contiguous() || is_broadcast_value(x)) return y;
  at::Tensor out = at::empty_like(x, x.options().dtype(y.scalar_type()));
  if (out.strides() == y.strides()) return y;
  return out.copy_(y);
}

}  // namespace regops
