// C++ CPU kernels of LoRA dropout, registered on the regops:: operators (schemas in regops/masks/ops.py).
// x is processed in row chunks: each chunk is masked into a small buffer (dropout's bits and rounding) and
// multiplied there, so no dropped copy of x exists; the mask is regenerated in backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_common.h"
#include "common/cpu_range.h"

namespace regops {
namespace cpu {
namespace {

constexpr int64_t kChunkElems = 1 << 18;  // elements of x per chunk: a few hundred KB, cache-sized
constexpr int64_t kGrainElems = 1 << 14;

// out[j] = T(C(in[j]) * m_j) for the flat elements [start, start + len), m_j = keep ? scale : 0.
template <typename T>
void mask_range(const T* in, T* out, int64_t start, int64_t len, uint64_t seed, uint64_t offset, int32_t threshold,
                float scale) {
  using C = typename Acc<T>::type;
  at::parallel_for(0, len, kGrainElems, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(end - begin);
    range_words(seed, offset, start + begin, end - begin, words.data());
    for (int64_t j = begin; j < end; ++j) {
      const C m = keep(words[j - begin], threshold) ? static_cast<C>(scale) : C(0);
      out[j] = static_cast<T>(static_cast<C>(in[j]) * m);
    }
  });
}

struct Shape {
  int64_t M, K, R, rows_per_chunk;
};

Shape shape_of(const at::Tensor& x, const at::Tensor& A, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && A.device().is_cpu(), "regops::", op, ": CPU tensors expected");
  TORCH_CHECK(x.dim() >= 1 && A.dim() == 2 && A.size(1) == x.size(-1), "regops::", op,
              ": x must be [..., K] and A [R, K], got ", x.sizes(), " and ", A.sizes());
  TORCH_CHECK(x.scalar_type() == A.scalar_type(), "regops::", op, ": x and A must have the same dtype");
  const int64_t K = x.size(-1), R = A.size(0);
  const int64_t M = K ? x.numel() / K : 0;
  return {M, K, R, std::max<int64_t>(1, kChunkElems / std::max<int64_t>(K, 1))};
}

at::Tensor lora_dropout(const at::Tensor& x, const at::Tensor& A, const at::Tensor& p, const at::Tensor& seed) {
  const HostSeed sd = host_seed(seed, "lora_dropout");
  const double pv = probability(p, "lora_dropout");
  const Shape s = shape_of(x, A, "lora_dropout");
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = s.R;
  at::Tensor y = at::empty(sizes, x.options());
  if (y.numel() == 0) return y;
  if (s.K == 0) return y.zero_();
  const at::Tensor xc = x.contiguous(), At = A.contiguous().t();
  at::Tensor y2 = y.view({s.M, s.R});
  at::Tensor buf = at::empty({std::min(s.rows_per_chunk, s.M), s.K}, x.options());
  const int32_t threshold = keep_threshold(pv);
  const float scale = dropout_scale(pv);
  REGOPS_CPU_FLOATING(x.scalar_type(), "lora_dropout", [&] {
    const T* xp = xc.const_data_ptr<T>();
    for (int64_t r0 = 0; r0 < s.M; r0 += s.rows_per_chunk) {
      const int64_t rows = std::min(s.rows_per_chunk, s.M - r0);
      mask_range(xp + r0 * s.K, buf.mutable_data_ptr<T>(), r0 * s.K, rows * s.K, sd.key, sd.offset, threshold, scale);
      at::Tensor out = y2.narrow(0, r0, rows);
      at::mm_out(out, buf.narrow(0, 0, rows), At);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> lora_dropout_backward(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& A, const at::Tensor& p,
                                                         const at::Tensor& seed, bool need_x, bool need_A) {
  const HostSeed sd = host_seed(seed, "lora_dropout_backward");
  const double pv = probability(p, "lora_dropout_backward");
  const Shape s = shape_of(x, A, "lora_dropout_backward");
  const int32_t threshold = keep_threshold(pv);
  const float scale = dropout_scale(pv);
  const at::Tensor xc = x.contiguous(), Ac = A.contiguous();
  const at::Tensor g2 = grad.contiguous().view({s.M, s.R});
  at::Tensor dx = need_x ? at::empty(x.sizes(), x.options()) : x.new_empty({0});
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dA_acc = need_A ? at::zeros({s.R, s.K}, A.options().dtype(acc)) : A.new_empty({0});
  if (s.M == 0 || s.K == 0) return {need_x ? dx.zero_() : dx, need_A ? dA_acc.to(A.scalar_type()) : dA_acc};
  at::Tensor buf = at::empty({std::min(s.rows_per_chunk, s.M), s.K}, x.options());
  REGOPS_CPU_FLOATING(x.scalar_type(), "lora_dropout_backward", [&] {
    const T* xp = xc.const_data_ptr<T>();
    for (int64_t r0 = 0; r0 < s.M; r0 += s.rows_per_chunk) {
      const int64_t rows = std::min(s.rows_per_chunk, s.M - r0);
      const at::Tensor g = g2.narrow(0, r0, rows);
      if (need_x) {
        at::Tensor d = dx.view({s.M, s.K}).narrow(0, r0, rows);
        at::mm_out(d, g, Ac);  // g A in x's dtype, then dropout's multiply: the unfused backward's rounding
        T* dp = d.mutable_data_ptr<T>();
        mask_range(dp, dp, r0 * s.K, rows * s.K, sd.key, sd.offset, threshold, scale);
      }
      if (need_A) {
        at::Tensor m = buf.narrow(0, 0, rows);
        mask_range(xp + r0 * s.K, m.mutable_data_ptr<T>(), r0 * s.K, rows * s.K, sd.key, sd.offset, threshold,
                   scale);
        dA_acc.addmm_(g.t().to(acc), m.to(acc));
      }
    }
  });
  return {dx, need_A ? dA_acc.to(A.scalar_type()) : dA_acc};
}

}  // namespace
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("lora_dropout", &regops::cpu::lora_dropout);
  m.impl("lora_dropout_backward", &regops::cpu::lora_dropout_backward);
}
