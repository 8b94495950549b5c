// CUDA bindings of the mixing op (regops::mix_apply) and its transpose (regops::mix_apply_backward) on the ops'
// schema; csrc/mix/kernels.cu holds the kernel.
#include <torch/library.h>

#include "common/cuda_bindings.h"
#include "mix/cuda.h"

namespace regops {
namespace {

// y[b] = x[b] mixed with x[index[b]] (see csrc/mix/kernels.cu); transpose: index is the inverse partner permutation.
// The output is channels_last for a channels_last 4-D x, contiguous otherwise.
at::Tensor mix_binding(const at::Tensor& x, const at::Tensor& w_self, const at::Tensor& w_other,
                       const at::Tensor& index, const at::Tensor& box, bool transpose, const char* op) {
  const int64_t batch = x.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool channels_last =
      x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor input = channels_last ? x : x.contiguous();
  at::Tensor y =
      at::empty_like(input, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t height = x.dim() == 2 ? 1 : x.size(-2);
  const int64_t width = x.dim() == 2 ? x.size(1) : x.size(-1);
  const DType dtype = input.scalar_type() == at::kByte ? DType::UInt8 : dtype_of(input, op);
  const at::Tensor ws = w_self.to(at::kFloat).contiguous(), wo = w_other.to(at::kFloat).contiguous();
  const at::Tensor idx = index.contiguous(), bx = box.contiguous();
  check_launch(mix_launch(input.const_data_ptr(), y.mutable_data_ptr(), batch, batch ? input.numel() / batch : 0,
                          channels_last ? x.size(1) : 1, height, width, channels_last, transpose,
                          ws.const_data_ptr<float>(), wo.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(),
                          bx.const_data_ptr<int64_t>(), dtype, c10::cuda::getCurrentCUDAStream()),
               op);
  return y;
}

void check_args(const at::Tensor& x, const at::Tensor& w_self, const at::Tensor& w_other, const at::Tensor& partner,
                const at::Tensor& box, const char* op) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 2, "regops::", op, ": x must be a CUDA tensor [B, ...]");
  const int64_t batch = x.size(0);
  TORCH_CHECK(w_self.numel() == batch && w_other.numel() == batch, "regops::", op, ": w_self and w_other must be [B]");
  TORCH_CHECK(partner.scalar_type() == at::kLong && partner.numel() == batch, "regops::", op,
              ": partner must be int64 [B]");
  TORCH_CHECK(box.scalar_type() == at::kLong && box.numel() == 4 * batch, "regops::", op,
              ": box must be int64 [B, 4]");
  TORCH_CHECK(w_self.device() == x.device() && w_other.device() == x.device() && partner.device() == x.device() &&
                  box.device() == x.device(),
              "regops::", op, ": all tensors must be on x's device");
}

at::Tensor mix_apply(const at::Tensor& x, const at::Tensor& w_self, const at::Tensor& w_other,
                     const at::Tensor& partner, const at::Tensor& box) {
  check_args(x, w_self, w_other, partner, box, "mix_apply");
  return mix_binding(x, w_self, w_other, partner, box, false, "mix_apply");
}

// The transposed mix reads, for each sample, the sample that took it as a partner: the inverse permutation,
// computed on the device (no host sync).
at::Tensor mix_apply_backward(const at::Tensor& grad, const at::Tensor& w_self, const at::Tensor& w_other,
                              const at::Tensor& partner, const at::Tensor& box) {
  check_args(grad, w_self, w_other, partner, box, "mix_apply_backward");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor p = partner.contiguous();
  at::Tensor inverse = at::empty_like(p);
  inverse.index_put_({p}, at::arange(p.numel(), p.options()));
  return mix_binding(grad, w_self, w_other, inverse, box, true, "mix_apply_backward");
}

}  // namespace
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CUDA, m) {
  m.impl("mix_apply", &regops::mix_apply);
  m.impl("mix_apply_backward", &regops::mix_apply_backward);
}
