// C++ CPU kernel of the fused Hutchinson accumulation (namespace regops_cpu, signature of
// regops.reference.hessian.probe_dot): per parameter p and probe k, dots[k, p] = <v_p[k], hv_p[k]>; per coordinate,
// diag = sum_k v[k] * hv[k] and diag_sq = sum_k (v[k] * hv[k])^2, over the parameters flattened and concatenated.
// One pass over v and hv. Coordinates are split into chunks fixed by the shape; each chunk's per-probe dot
// products are kept apart (in double) and added in chunk order, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu_common.h"

namespace regops {
namespace cpu {
namespace {

constexpr int64_t kChunk = 4096;  // coordinates per parallel chunk

template <typename T, typename C>
void probe_dot_param(const T* __restrict__ v, const T* __restrict__ hv, int64_t k, int64_t n, C* __restrict__ diag,
                     C* __restrict__ diag_sq, double* __restrict__ partial) {
  // partial[chunk * k + probe]: that chunk's share of the probe's dot product.
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<C> d(kChunk), d2(kChunk);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t first = c * kChunk, len = std::min(kChunk, n - first);
      for (int64_t i = 0; i < len; ++i) d[i] = d2[i] = C(0);
      for (int64_t probe = 0; probe < k; ++probe) {
        const T* vr = v + probe * n + first;
        const T* hr = hv + probe * n + first;
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= len; i += 8) {
          for (int j = 0; j < 8; ++j) {
            const C prod = static_cast<C>(vr[i + j]) * static_cast<C>(hr[i + j]);
            d[i + j] += prod;
            d2[i + j] += prod * prod;
            acc[j] += static_cast<double>(prod);
          }
        }
        double tail = 0.0;
        for (; i < len; ++i) {
          const C prod = static_cast<C>(vr[i]) * static_cast<C>(hr[i]);
          d[i] += prod;
          d2[i] += prod * prod;
          tail += static_cast<double>(prod);
        }
        partial[c * k + probe] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
      }
      if (diag) {
        for (int64_t i = 0; i < len; ++i) {
          diag[first + i] = d[i];
          diag_sq[first + i] = d2[i];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> probe_dot(at::TensorList vs, at::TensorList hvs, bool with_diag) {
  const char* op = "hessian_probe_dot";
  TORCH_CHECK(!vs.empty() && vs.size() == hvs.size(), "regops_cpu::hessian_probe_dot: vs and hvs must be non-empty "
              "lists of the same length");
  const at::ScalarType dtype = vs[0].scalar_type();
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t k = vs[0].dim() ? vs[0].size(0) : 0, params = static_cast<int64_t>(vs.size());
  int64_t total = 0;
  for (int64_t p = 0; p < params; ++p) {
    TORCH_CHECK(vs[p].device().is_cpu() && hvs[p].device().is_cpu(), "regops_cpu::", op, ": CPU tensors expected");
    TORCH_CHECK(vs[p].sizes() == hvs[p].sizes() && vs[p].dim() >= 1 && vs[p].size(0) == k,
                "regops_cpu::", op, ": v and hv of parameter ", p, " must have the same shape [K, ...], K = ", k);
    TORCH_CHECK(vs[p].scalar_type() == dtype && hvs[p].scalar_type() == dtype, "regops_cpu::", op,
                ": all probes and products must have one dtype");
    total += k ? vs[p].numel() / k : 0;
  }
  const auto options = vs[0].options().dtype(acc);
  at::Tensor dots = at::empty({k, params}, options);
  at::Tensor diag = with_diag ? at::empty({total}, options) : at::zeros({0}, options);
  at::Tensor diag_sq = with_diag ? at::empty({total}, options) : at::zeros({0}, options);
  REGOPS_CPU_FLOATING(dtype, op, [&] {
    using C = typename Acc<T>::type;
    C* dp = dots.mutable_data_ptr<C>();
    int64_t offset = 0;
    for (int64_t p = 0; p < params; ++p) {
      const at::Tensor v = vs[p].contiguous(), hv = hvs[p].contiguous();
      const int64_t n = k ? v.numel() / k : 0;
      const int64_t chunks = (n + kChunk - 1) / kChunk;
      std::vector<double> partial(chunks * k, 0.0);
      if (n > 0 && k > 0) {
        probe_dot_param<T, C>(v.const_data_ptr<T>(), hv.const_data_ptr<T>(), k, n,
                              with_diag ? diag.mutable_data_ptr<C>() + offset : nullptr,
                              with_diag ? diag_sq.mutable_data_ptr<C>() + offset : nullptr, partial.data());
      }
      for (int64_t probe = 0; probe < k; ++probe) {
        double sum = 0.0;
        for (int64_t c = 0; c < chunks; ++c) sum += partial[c * k + probe];
        dp[probe * params + p] = static_cast<C>(sum);
      }
      offset += n;
    }
  });
  return {dots, diag, diag_sq};
}

}  // namespace
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops_cpu, CPU, m) { m.impl("hessian_probe_dot", &regops::cpu::probe_dot); }
