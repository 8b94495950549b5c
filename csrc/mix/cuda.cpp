// The mixing kernel's CUDA bindings (namespace regops_C; csrc/mix/cuda.cu holds the kernel).
#include <torch/library.h>

#include "common/cuda_bindings.h"
#include "mix/cuda.h"

namespace {

using regops::check_launch;
using regops::dtype_of;

at::Tensor mix_launch(const at::Tensor& x, const at::Tensor& w_self, const at::Tensor& w_other,
                      const at::Tensor& index, const at::Tensor& box, bool transpose) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 2, "regops_C::mix_apply: x must be a CUDA tensor [B, ...]");
  const int64_t batch = x.size(0);
  TORCH_CHECK(w_self.scalar_type() == at::kFloat && w_other.scalar_type() == at::kFloat &&
                  w_self.numel() == batch && w_other.numel() == batch,
              "regops_C::mix_apply: w_self and w_other must be float32 [B]");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.numel() == batch,
              "regops_C::mix_apply: index must be int64 [B]");
  TORCH_CHECK(box.scalar_type() == at::kLong && box.numel() == 4 * batch,
              "regops_C::mix_apply: box must be int64 [B, 4]");
  TORCH_CHECK(w_self.device() == x.device() && w_other.device() == x.device() && index.device() == x.device() &&
                  box.device() == x.device(),
              "regops_C::mix_apply: all tensors must be on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool channels_last =
      x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor input = channels_last ? x : x.contiguous();
  at::Tensor y =
      at::empty_like(input, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t height = x.dim() == 2 ? 1 : x.size(-2);
  const int64_t width = x.dim() == 2 ? x.size(1) : x.size(-1);
  const regops::DType dtype =
      input.scalar_type() == at::kByte ? regops::DType::UInt8 : dtype_of(input, "mix_apply");
  const at::Tensor ws = w_self.contiguous(), wo = w_other.contiguous(), idx = index.contiguous(),
                   bx = box.contiguous();
  check_launch(regops::mix_launch(input.const_data_ptr(), y.mutable_data_ptr(), batch,
                                  batch ? input.numel() / batch : 0, channels_last ? x.size(1) : 1, height, width,
                                  channels_last, transpose, ws.const_data_ptr<float>(), wo.const_data_ptr<float>(),
                                  idx.const_data_ptr<int64_t>(), bx.const_data_ptr<int64_t>(), dtype,
                                  c10::cuda::getCurrentCUDAStream()),
               "mix_apply");
  return y;
}

// y[b] = x[b] mixed with x[partner[b]] (see csrc/mix.cu).
at::Tensor mix_apply(const at::Tensor& x, const at::Tensor& w_self, const at::Tensor& w_other,
                     const at::Tensor& partner, const at::Tensor& box) {
  return mix_launch(x, w_self, w_other, partner, box, false);
}

// The transposed mix (gradient w.r.t. x); `inverse` is the inverse of the partner permutation.
at::Tensor mix_apply_backward(const at::Tensor& grad, const at::Tensor& w_self, const at::Tensor& w_other,
                              const at::Tensor& inverse, const at::Tensor& box) {
  return mix_launch(grad, w_self, w_other, inverse, box, true);
}

}  // namespace

TORCH_LIBRARY(regops_C, m) {
  m.def("mix_apply(Tensor x, Tensor w_self, Tensor w_other, Tensor partner, Tensor box) -> Tensor");
  m.def("mix_apply_backward(Tensor grad, Tensor w_self, Tensor w_other, Tensor inverse, Tensor box) -> Tensor");
}

TORCH_LIBRARY_IMPL(regops_C, CUDA, m) {
  m.impl("mix_apply", &mix_apply);
  m.impl("mix_apply_backward", &mix_apply_backward);
}
