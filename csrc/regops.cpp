// regops._C, CUDA part (built when nvcc and a CUDA torch exist): schemas of the CUDA kernels (namespace
// regops_C) and their CUDA implementations. The module itself and the CPU kernels: csrc/module.cpp, cpu_*.cpp.
// The kernels themselves are plain CUDA in csrc/*.cu (declared in kernels.h); this file only checks tensors
// and launches them on the current stream. Fake (meta) impls are registered from Python (regops/_backend.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

regops::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return regops::DType::Float32;
    case at::kHalf:
      return regops::DType::Float16;
    case at::kBFloat16:
      return regops::DType::BFloat16;
    case at::kDouble:
      return regops::DType::Float64;
    default:
      TORCH_CHECK(false, "regops_C::", op, ": unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "regops_C::", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// The int64 [2] (key, first counter) tensor on the op's device; the kernels read it there (CUDA-graph safe).
const int64_t* seed_ptr(const at::Tensor& seed, const at::Tensor& like, const char* op) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2 && seed.is_contiguous(), "regops_C::", op,
              ": seed must be a contiguous int64 tensor of 2 elements");
  TORCH_CHECK(seed.device() == like.device(), "regops_C::", op, ": seed must be on ", like.device(), ", got ",
              seed.device());
  return seed.const_data_ptr<int64_t>();
}

at::Tensor dropout(const at::Tensor& x, int64_t threshold, double scale, const at::Tensor& seed) {
  TORCH_CHECK(x.is_cuda(), "regops_C::dropout: x must be a CUDA tensor");
  TORCH_CHECK(threshold >= -1 && threshold < (int64_t{1} << 31), "regops_C::dropout: threshold out of range");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  check_launch(regops::dropout_launch(input.const_data_ptr(), y.mutable_data_ptr(), input.numel(),
                                      dtype_of(input, "dropout"), static_cast<int32_t>(threshold),
                                      static_cast<float>(scale), seed_ptr(seed, x, "dropout"),
                                      c10::cuda::getCurrentCUDAStream()),
               "dropout");
  return y;
}

at::Tensor bias_dropout_add(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                            int64_t threshold, double scale, const at::Tensor& seed) {
  TORCH_CHECK(x.is_cuda() && residual.is_cuda(), "regops_C::bias_dropout_add: x and residual must be CUDA tensors");
  TORCH_CHECK(x.dim() >= 1 && residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "regops_C::bias_dropout_add: residual must match x's shape and dtype");
  TORCH_CHECK(threshold >= -1 && threshold < (int64_t{1} << 31), "regops_C::bias_dropout_add: bad threshold");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous(), res = residual.contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == x.size(-1) && b.scalar_type() == x.scalar_type() && b.is_cuda(),
                "regops_C::bias_dropout_add: bias must be a CUDA [H] tensor of x's dtype");
  }
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  const int64_t cols = x.size(-1), rows = cols ? input.numel() / cols : 0;
  check_launch(regops::bias_dropout_add_launch(input.const_data_ptr(), b.defined() ? b.const_data_ptr() : nullptr,
                                               res.const_data_ptr(), y.mutable_data_ptr(), rows, cols,
                                               dtype_of(input, "bias_dropout_add"), static_cast<int32_t>(threshold),
                                               static_cast<float>(scale), seed_ptr(seed, x, "bias_dropout_add"),
                                               c10::cuda::getCurrentCUDAStream()),
               "bias_dropout_add");
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad, bool has_bias,
                                                             int64_t threshold, double scale,
                                                             const at::Tensor& seed) {
  TORCH_CHECK(grad.is_cuda() && grad.dim() >= 1, "regops_C::bias_dropout_add_backward: grad must be a CUDA tensor");
  TORCH_CHECK(threshold >= -1 && threshold < (int64_t{1} << 31), "regops_C::bias_dropout_add_backward: bad threshold");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous();
  at::Tensor dx = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t cols = g.size(-1), rows = cols ? g.numel() / cols : 0;
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int chunks = regops::bias_dropout_add_row_chunks(rows, cols);
  at::Tensor parts = has_bias ? at::zeros({chunks, cols}, g.options().dtype(acc)) : at::Tensor();
  check_launch(regops::bias_dropout_add_backward_launch(
                   g.const_data_ptr(), dx.mutable_data_ptr(), has_bias ? parts.mutable_data_ptr() : nullptr, rows,
                   cols, dtype_of(g, "bias_dropout_add_backward"), static_cast<int32_t>(threshold),
                   static_cast<float>(scale), seed_ptr(seed, grad, "bias_dropout_add_backward"), chunks,
                   c10::cuda::getCurrentCUDAStream()),
               "bias_dropout_add_backward");
  at::Tensor dbias = has_bias ? parts.sum(0) : at::empty({0}, g.options().dtype(acc));
  return {dx, dbias};
}

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
  m.def("dropout(Tensor x, int threshold, float scale, Tensor seed) -> Tensor");
  m.def("bias_dropout_add(Tensor x, Tensor? bias, Tensor residual, int threshold, float scale, Tensor seed) -> Tensor");
  m.def("bias_dropout_add_backward(Tensor grad, bool has_bias, int threshold, float scale, Tensor seed) "
        "-> (Tensor, Tensor)");
  m.def("mix_apply(Tensor x, Tensor w_self, Tensor w_other, Tensor partner, Tensor box) -> Tensor");
  m.def("mix_apply_backward(Tensor grad, Tensor w_self, Tensor w_other, Tensor inverse, Tensor box) -> Tensor");
}

TORCH_LIBRARY_IMPL(regops_C, CUDA, m) {
  m.impl("dropout", &dropout);
  m.impl("bias_dropout_add", &bias_dropout_add);
  m.impl("bias_dropout_add_backward", &bias_dropout_add_backward);
  m.impl("mix_apply", &mix_apply);
  m.impl("mix_apply_backward", &mix_apply_backward);
}
