// C++ CPU kernels of the activation-sparsity penalty, registered on the regops:: operators (schemas in
// regops/penalties/ops.py): one pass computes ReLU / ReLU^2 / FATReLU and the sparsity statistics; the backward
// adds the L1 gradient, (g + l1) * d act / dx, in the same pass as the activation's own.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_common.h"

namespace regops {
namespace cpu {
namespace {

constexpr int64_t kChunkElems = 1 << 15;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relu_l1(const at::Tensor& x, const at::Tensor& l1,
                                                                   double threshold, bool squared, bool stats) {
  TORCH_CHECK(x.device().is_cpu(), "regops::relu_l1: x must be a CPU tensor");
  const at::Tensor xc = x.contiguous();
  const int64_t d = x.dim() ? x.size(-1) : 1;
  const int64_t M = d ? xc.numel() / d : 0;
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  std::vector<int64_t> token_sizes(x.sizes().begin(), x.sizes().end());
  if (!token_sizes.empty()) token_sizes.pop_back();
  at::Tensor token = stats ? at::empty(token_sizes, x.options().dtype(acc)) : x.new_empty({0}, x.options().dtype(acc));
  at::Tensor unit = x.new_empty({stats ? d : 0}, x.options().dtype(acc));
  at::Tensor total = stats ? at::zeros({}, x.options().dtype(acc)) : x.new_empty({0}, x.options().dtype(acc));
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(d, 1));
  const int64_t chunks = M ? (M + rows_per_chunk - 1) / rows_per_chunk : 0;
  at::Tensor counts = at::zeros({stats ? chunks : 0, stats ? d : 0}, x.options().dtype(at::kLong));
  at::Tensor row_sums = x.new_empty({stats ? M : 0}, x.options().dtype(acc));
  REGOPS_CPU_FLOATING(x.scalar_type(), "relu_l1", [&] {
    using C = typename Acc<T>::type;
    const C thr = static_cast<C>(threshold);
    const T* xp = xc.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    C* tp = stats ? token.mutable_data_ptr<C>() : nullptr;
    C* rs = stats ? row_sums.mutable_data_ptr<C>() : nullptr;
    int64_t* cp = stats ? counts.mutable_data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t r1 = std::min(M, (c + 1) * rows_per_chunk);
        for (int64_t r = c * rows_per_chunk; r < r1; ++r) {
          int64_t active = 0;
          C sum = C(0);
          for (int64_t j = 0; j < d; ++j) {
            const C v = static_cast<C>(xp[r * d + j]);
            const C a = v <= thr ? C(0) : (squared ? v * v : v);  // NaN passes through, as torch.relu
            const T out = static_cast<T>(a);
            yp[r * d + j] = out;
            if (stats) {
              const bool on = v > thr;
              active += on;
              cp[c * d + j] += on;
              sum = sum + static_cast<C>(out);
            }
          }
          if (stats) {
            tp[r] = static_cast<C>(active) / static_cast<C>(d);
            rs[r] = sum;
          }
        }
      }
    });
    if (stats) {
      C s = C(0);
      for (int64_t r = 0; r < M; ++r) s = s + rs[r];
      total.fill_(s);
      unit.copy_(counts.sum(0).to(acc) / static_cast<double>(std::max<int64_t>(M, 1)));
      if (M == 0) unit.fill_(std::nan(""));
    }
  });
  return {y.view(x.sizes()), token, unit, total};
}

at::Tensor relu_l1_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& l1, double threshold,
                            bool squared) {
  TORCH_CHECK(x.device().is_cpu() && grad.device().is_cpu(), "regops::relu_l1_backward: CPU tensors expected");
  TORCH_CHECK(l1.numel() == 1, "regops::relu_l1_backward: l1 must be a one-element tensor");
  const double l1v = l1.to(at::kDouble).item<double>();
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous().to(x.scalar_type());
  at::Tensor dx = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t n = xc.numel();
  REGOPS_CPU_FLOATING(x.scalar_type(), "relu_l1_backward", [&] {
    using C = typename Acc<T>::type;
    const C thr = static_cast<C>(threshold), l = static_cast<C>(l1v);
    const T* xp = xc.const_data_ptr<T>();
    const T* gp = gc.const_data_ptr<T>();
    T* dp = dx.mutable_data_ptr<T>();
    at::parallel_for(0, n, kChunkElems, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const C v = static_cast<C>(xp[i]);
        const C m = v > thr ? C(1) : C(0);
        const C deriv = squared ? (v + v) * m : m;
        dp[i] = static_cast<T>((static_cast<C>(gp[i]) + l) * deriv);
      }
    });
  });
  return dx.view(x.sizes());
}

}  // namespace
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("relu_l1", &regops::cpu::relu_l1);
  m.impl("relu_l1_backward", &regops::cpu::relu_l1_backward);
}
