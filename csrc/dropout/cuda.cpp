// The dropout family's CUDA kernels on the regops:: operators (schemas in regops/dropout/ops.py): checks the
// tensors and launches the plain-CUDA kernels of csrc/dropout/cuda*.cu on the current stream of x's device.
#include <torch/library.h>

#include "common/cuda_bindings.h"
#include "dropout/cuda.h"

namespace regops {
namespace {

at::Tensor dropout(const at::Tensor& x, const at::Tensor& p, const at::Tensor& seed) {
  const char* op = "dropout";
  TORCH_CHECK(x.is_cuda(), "regops::dropout: x must be a CUDA tensor");
  const double pv = probability(p, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  check_launch(dropout_launch(input.const_data_ptr(), y.mutable_data_ptr(), input.numel(), dtype_of(input, op),
                              keep_threshold(pv), dropout_scale(pv), device_seed(seed, x, op),
                              c10::cuda::getCurrentCUDAStream()),
               op);
  return in_layout_of(x, y);
}

at::Tensor bias_dropout_add(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                            const at::Tensor& p, const at::Tensor& seed) {
  const char* op = "bias_dropout_add";
  TORCH_CHECK(x.is_cuda() && residual.is_cuda(), "regops::bias_dropout_add: x and residual must be CUDA tensors");
  TORCH_CHECK(x.dim() >= 1 && residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "regops::bias_dropout_add: residual must match x's shape and dtype");
  const double pv = probability(p, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous(), res = residual.contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == x.size(-1) && b.scalar_type() == x.scalar_type() && b.is_cuda(),
                "regops::bias_dropout_add: bias must be a CUDA [H] tensor of x's dtype");
  }
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  const int64_t cols = x.size(-1), rows = cols ? input.numel() / cols : 0;
  check_launch(bias_dropout_add_launch(input.const_data_ptr(), b.defined() ? b.const_data_ptr() : nullptr,
                                       res.const_data_ptr(), y.mutable_data_ptr(), rows, cols, dtype_of(input, op),
                                       keep_threshold(pv), dropout_scale(pv), device_seed(seed, x, op),
                                       c10::cuda::getCurrentCUDAStream()),
               op);
  return in_layout_of(x, y);
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad, bool has_bias,
                                                             const at::Tensor& p, const at::Tensor& seed) {
  const char* op = "bias_dropout_add_backward";
  TORCH_CHECK(grad.is_cuda() && grad.dim() >= 1, "regops::bias_dropout_add_backward: grad must be a CUDA tensor");
  const double pv = probability(p, op);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous();
  at::Tensor dx = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t cols = g.size(-1), rows = cols ? g.numel() / cols : 0;
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int chunks = bias_dropout_add_row_chunks(rows, cols);
  at::Tensor parts = has_bias ? at::zeros({chunks, cols}, g.options().dtype(acc)) : at::Tensor();
  check_launch(bias_dropout_add_backward_launch(g.const_data_ptr(), dx.mutable_data_ptr(),
                                                has_bias ? parts.mutable_data_ptr() : nullptr, rows, cols,
                                                dtype_of(g, op), keep_threshold(pv), dropout_scale(pv),
                                                device_seed(seed, grad, op), chunks, c10::cuda::getCurrentCUDAStream()),
               op);
  at::Tensor dbias = has_bias ? parts.sum(0) : at::empty({0}, g.options().dtype(acc));
  return {in_layout_of(grad, dx), dbias};
}

}  // namespace
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CUDA, m) {
  m.impl("dropout", &regops::dropout);
  m.impl("bias_dropout_add", &regops::bias_dropout_add);
  m.impl("bias_dropout_add_backward", &regops::bias_dropout_add_backward);
}
