// C++ CPU kernels of the merge ops, registered on the regops:: operators (schemas in regops/merge/ops.py).
// merge_chunk reads one chunk of the base and of the K deltas once and writes the merged chunk: masks
// regenerated from each delta's Philox stream at the chunk's global element indices (so chunking never
// changes them), magnitude trims from (threshold, cut) pairs, sign election and disjoint mean in the same pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>
#include <vector>

#include "common/cpu_common.h"
#include "common/cpu_range.h"

namespace regops {
namespace cpu {
namespace {

constexpr int64_t kSub = 2048;  // elements per task: K values of each stay in cache between the two passes

enum class Keep { All, Random, Magnitude };
enum class Combine { Sum, Total, Frequency };

Keep keep_of(std::string_view s) {
  if (s == "all") return Keep::All;
  if (s == "random") return Keep::Random;
  TORCH_CHECK_VALUE(s == "magnitude", "regops::merge_chunk: keep must be all, random or magnitude, got ", s);
  return Keep::Magnitude;
}

Combine combine_of(std::string_view s) {
  if (s == "sum") return Combine::Sum;
  if (s == "total") return Combine::Total;
  TORCH_CHECK_VALUE(s == "frequency", "regops::merge_chunk: combine must be sum, total or frequency, got ", s);
  return Combine::Frequency;
}

template <typename V>
std::vector<V> host_vector(const at::Tensor& t, at::ScalarType dtype, int64_t n, const char* name) {
  TORCH_CHECK(t.numel() == n && t.scalar_type() == dtype, "regops::merge_chunk: ", name, " must have ", n,
              " elements of ", dtype, ", got ", t.scalar_type(), " ", t.sizes());
  const at::Tensor c = t.cpu().contiguous();
  return std::vector<V>(c.const_data_ptr<V>(), c.const_data_ptr<V>() + n);
}

template <typename C>
inline C sign_of(C v) {
  return v > C(0) ? C(1) : (v < C(0) ? C(-1) : C(0));
}

at::Tensor merge_chunk(const at::Tensor& base, at::TensorList deltas, const at::Tensor& weights,
                       const at::Tensor& seeds, const at::Tensor& thresholds, const at::Tensor& cuts,
                       const at::Tensor& density, int64_t first, std::string_view keep_s, std::string_view combine_s,
                       bool finetuned, bool rescale) {
  const Keep keep_mode = keep_of(keep_s);
  const Combine combine = combine_of(combine_s);
  const int64_t n = base.numel(), K = static_cast<int64_t>(deltas.size());
  TORCH_CHECK(base.device().is_cpu(), "regops::merge_chunk: CPU tensors expected");
  std::vector<at::Tensor> ds;
  for (const at::Tensor& d : deltas) {
    TORCH_CHECK(d.numel() == n && d.scalar_type() == base.scalar_type() && d.device().is_cpu(),
                "regops::merge_chunk: every delta must be a CPU tensor with the base's dtype and size");
    ds.push_back(d.contiguous());
  }
  const double dens = probability(density, "merge_chunk");
  const std::vector<double> w = host_vector<double>(weights, at::kDouble, K, "weights");
  const std::vector<double> thr = host_vector<double>(thresholds, at::kDouble, K, "thresholds");
  const std::vector<int64_t> cut = host_vector<int64_t>(cuts, at::kLong, K, "cuts");
  const std::vector<int64_t> sd = host_vector<int64_t>(seeds, at::kLong, 2 * K, "seeds");
  const at::Tensor bc = base.contiguous();
  at::Tensor out = at::empty_like(bc, at::MemoryFormat::Contiguous);
  if (n == 0) return out;
  const int32_t threshold = keep_threshold(1.0 - dens);
  REGOPS_CPU_FLOATING(base.scalar_type(), "merge_chunk", [&] {
    using C = typename Acc<T>::type;
    const C scale = (keep_mode == Keep::Random && rescale) ? static_cast<C>(1.0 / dens) : C(1);
    const T* bp = bc.const_data_ptr<T>();
    std::vector<const T*> dp;
    for (const at::Tensor& d : ds) dp.push_back(d.const_data_ptr<T>());
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, n, kSub, [&](int64_t begin, int64_t end) {
      const int64_t len = end - begin;
      std::vector<C> s(static_cast<size_t>(K * len));
      std::vector<uint32_t> words(keep_mode == Keep::Random ? len : 0);
      for (int64_t k = 0; k < K; ++k) {
        if (keep_mode == Keep::Random) {
          range_words(static_cast<uint64_t>(sd[2 * k]), static_cast<uint64_t>(sd[2 * k + 1]), first + begin, len,
                      words.data());
        }
        const C t = static_cast<C>(thr[k]);
        C* sk = s.data() + k * len;
        for (int64_t j = 0; j < len; ++j) {
          C dl = static_cast<C>(dp[k][begin + j]);
          if (finetuned) dl = dl - static_cast<C>(bp[begin + j]);
          C m = C(1);
          if (keep_mode == Keep::Random) {
            m = keep(words[j], threshold) ? scale : C(0);
          } else if (keep_mode == Keep::Magnitude) {
            const C a = std::abs(dl);
            m = (a > t || (a == t && first + begin + j < cut[k])) ? C(1) : C(0);
          }
          sk[j] = dl * m;
        }
      }
      for (int64_t j = 0; j < len; ++j) {
        const C b = static_cast<C>(bp[begin + j]);
        C acc = C(0);
        if (combine == Combine::Sum) {
          for (int64_t k = 0; k < K; ++k) acc = acc + static_cast<C>(w[k]) * s[k * len + j];
          op[begin + j] = static_cast<T>(b + acc);
          continue;
        }
        C e = C(0);
        for (int64_t k = 0; k < K; ++k) {
          const C v = s[k * len + j];
          e = e + (combine == Combine::Total ? v : sign_of(v));
        }
        const C elected = e >= C(0) ? C(1) : C(-1);
        C count = C(0);
        for (int64_t k = 0; k < K; ++k) {
          const C v = s[k * len + j];
          const bool agree = sign_of(v) == elected;  // adding 0 otherwise: the reference's signed zeros
          acc = acc + (agree ? static_cast<C>(w[k]) * v : C(0));
          count = count + (agree ? C(1) : C(0));
        }
        op[begin + j] = static_cast<T>(b + acc / std::max(count, C(1)));
      }
    });
  });
  return out;
}

// u[j] = (word >> 1) * 2^-31 of the flat elements [first, first + n) of seed's stream (float64, exact).
at::Tensor merge_uniform(const at::Tensor& seed, int64_t first, int64_t n) {
  const HostSeed sd = host_seed(seed, "merge_uniform");
  TORCH_CHECK_VALUE(n >= 0 && first >= 0, "regops::merge_uniform: first and n must be non-negative");
  at::Tensor u = at::empty({n}, seed.options().dtype(at::kDouble));
  double* up = u.mutable_data_ptr<double>();
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(end - begin);
    range_words(static_cast<uint64_t>(sd.key), static_cast<uint64_t>(sd.offset), first + begin, end - begin,
                words.data());
    for (int64_t j = begin; j < end; ++j) up[j] = std::ldexp(static_cast<double>(words[j - begin] >> 1), -31);
  });
  return u;
}

}  // namespace
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("merge_chunk", &regops::cpu::merge_chunk);
  m.impl("merge_uniform", &regops::cpu::merge_uniform);
}
