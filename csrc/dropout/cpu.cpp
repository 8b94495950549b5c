// C++ CPU kernels of the dropout ops, registered on the regops:: operators (schemas in regops/dropout/ops.py):
// dropout, dropout_bitmask, apply_bitmask, multi_sample_dropout_mean, scale_rows_add (drop path's application),
// nested_dropout. Multiply semantics, as torch: y = x * (keep ? scale : 0) in float32 (float64 for float64),
// rounded once to x's dtype, so a NaN or inf at a dropped position stays NaN.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common/cpu_common.h"

namespace regops {
namespace cpu {

#if defined(__GNUC__)
// The block's counters side by side, each 32-bit Philox word in a 64-bit lane: a round's 32 x 32 -> 64-bit
// products are then lane-wise multiplies, which every clone maps to its ISA's widening multiply (the scalar form
// below does not vectorize: the compiler keeps one counter per register).
using Lanes = uint64_t __attribute__((vector_size(8 * kBlockCounters)));

REGOPS_CPU_CLONES void philox_block(uint64_t seed, uint64_t first, uint32_t* __restrict__ words) {
  Lanes counter;
  for (int64_t j = 0; j < kBlockCounters; ++j) counter[j] = first + static_cast<uint64_t>(j);
  const Lanes low = (counter - counter) + 0xFFFFFFFFull;
  Lanes c0 = counter & low, c1 = counter >> 32, c2 = counter - counter, c3 = c2 + kStreamC3;
  uint64_t k0 = static_cast<uint32_t>(seed), k1 = seed >> 32;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const Lanes pb = c2 * 0xCD9E8D57ull, pa = c0 * 0xD2511F53ull;
    c0 = (pb >> 32) ^ c1 ^ k0;
    c2 = (pa >> 32) ^ c3 ^ k1;
    c1 = pb & low;
    c3 = pa & low;
    k0 = (k0 + 0x9E3779B9u) & 0xFFFFFFFFull;
    k1 = (k1 + 0xBB67AE85u) & 0xFFFFFFFFull;
  }
  for (int64_t j = 0; j < kBlockCounters; ++j) {
    words[4 * j] = static_cast<uint32_t>(c0[j]);
    words[4 * j + 1] = static_cast<uint32_t>(c1[j]);
    words[4 * j + 2] = static_cast<uint32_t>(c2[j]);
    words[4 * j + 3] = static_cast<uint32_t>(c3[j]);
  }
}
#else
void philox_block(uint64_t seed, uint64_t first, uint32_t* __restrict__ words) {
  for (int64_t j = 0; j < kBlockCounters; ++j) {
    const Words4 r = philox4x32_10(seed, first + static_cast<uint64_t>(j));
    words[4 * j] = r.w[0];
    words[4 * j + 1] = r.w[1];
    words[4 * j + 2] = r.w[2];
    words[4 * j + 3] = r.w[3];
  }
}
#endif

namespace {

// y[i] = x[i] * m[i] for the elements [base, base + len) of a block.
template <typename T>
inline void apply_block(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ m, int64_t len) {
  using C = typename Acc<T>::type;
  for (int64_t i = 0; i < len; ++i) y[i] = static_cast<T>(static_cast<C>(x[i]) * static_cast<C>(m[i]));
}

// Runs body(block_index, words, first_element, len) over every block of a flat call of n elements, in parallel.
template <typename Body>
void for_each_block(int64_t n, uint64_t seed, uint64_t offset, const Body& body) {
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[kBlockElems];
    for (int64_t b = begin; b < end; ++b) {
      philox_block(seed, offset + static_cast<uint64_t>(b * kBlockCounters), words);
      const int64_t first = b * kBlockElems;
      body(b, words, first, std::min(kBlockElems, n - first));
    }
  });
}

at::Tensor dropout_kernel(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.device().is_cpu(), "regops::dropout: x must be a CPU tensor");
  check_p(p, "dropout");
  const bool broadcast = is_broadcast_value(x);  // every block reads the one value (a block of copies of it)
  const at::Tensor input = broadcast ? x : x.contiguous();
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  const int32_t threshold = keep_threshold(p);
  const float scale = dropout_scale(p);
  REGOPS_CPU_FLOATING(input.scalar_type(), "dropout", [&] {
    const T* xp = input.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    alignas(64) T value_block[kBlockElems];
    if (broadcast) std::fill(value_block, value_block + kBlockElems, xp[0]);
    for_each_block(input.numel(), seed, offset, [&](int64_t, const uint32_t* words, int64_t first, int64_t len) {
      alignas(64) float m[kBlockElems];
      block_multipliers(words, threshold, scale, m);
      apply_block(broadcast ? value_block : xp + first, yp + first, m, len);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> dropout_bitmask_kernel(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.device().is_cpu(), "regops::dropout_bitmask: x must be a CPU tensor");
  check_p(p, "dropout_bitmask");
  const at::Tensor input = x.contiguous();
  const int64_t n = input.numel();
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  at::Tensor bits = at::empty({(n + 7) / 8}, input.options().dtype(at::kByte));
  const int32_t threshold = keep_threshold(p);
  const float scale = dropout_scale(p);
  uint8_t* bp = bits.mutable_data_ptr<uint8_t>();
  REGOPS_CPU_FLOATING(input.scalar_type(), "dropout_bitmask", [&] {
    const T* xp = input.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    for_each_block(n, seed, offset, [&](int64_t, const uint32_t* words, int64_t first, int64_t len) {
      alignas(64) float m[kBlockElems];
      block_multipliers(words, threshold, scale, m);
      apply_block(xp + first, yp + first, m, len);
      // Bit j of byte k is element 8k + j; bits past the end stay 0 (as the reference pads).
      for (int64_t byte = 0; byte < (len + 7) / 8; ++byte) {
        uint32_t packed = 0;
        for (int64_t j = 0; j < 8; ++j) {
          const int64_t i = 8 * byte + j;
          packed |= static_cast<uint32_t>(i < len && keep(words[i], threshold)) << j;
        }
        bp[first / 8 + byte] = static_cast<uint8_t>(packed);
      }
    });
  });
  return {y, bits};
}

at::Tensor apply_bitmask_kernel(const at::Tensor& g, const at::Tensor& packed, double scale) {
  TORCH_CHECK(g.device().is_cpu() && packed.device().is_cpu(), "regops::apply_bitmask: CPU tensors expected");
  const int64_t n = g.numel();
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.numel() == (n + 7) / 8,
              "regops::apply_bitmask: the mask must be uint8 [ceil(numel / 8)] = [", (n + 7) / 8, "], got ",
              packed.scalar_type(), " ", packed.sizes());
  const at::Tensor grad = g.contiguous(), bits = packed.contiguous();
  at::Tensor y = at::empty_like(grad, at::MemoryFormat::Contiguous);
  const uint8_t* bp = bits.const_data_ptr<uint8_t>();
  REGOPS_CPU_FLOATING(grad.scalar_type(), "apply_bitmask", [&] {
    using C = typename Acc<T>::type;
    const C s = static_cast<C>(scale);
    const T* gp = grad.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    at::parallel_for(0, (n + kBlockElems - 1) / kBlockElems, kGrainBlocks, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t first = b * kBlockElems, len = std::min(kBlockElems, n - first);
        alignas(64) C m[kBlockElems];
        for (int64_t i = 0; i < len; ++i) m[i] = ((bp[(first + i) >> 3] >> ((first + i) & 7)) & 1) ? s : C(0);
        for (int64_t i = 0; i < len; ++i) yp[first + i] = static_cast<T>(static_cast<C>(gp[first + i]) * m[i]);
      }
    });
  });
  return y;
}

// y = x * (count * (scale / K)), count = kept samples of K masks; sample k uses first counter offset + k * ceil(n/4).
at::Tensor multi_sample_dropout_mean_kernel(const at::Tensor& x, double p, int64_t num_samples, int64_t seed,
                                     int64_t offset) {
  TORCH_CHECK(x.device().is_cpu(), "regops::multi_sample_dropout_mean: x must be a CPU tensor");
  check_p(p, "multi_sample_dropout_mean");
  TORCH_CHECK(num_samples >= 1, "regops::multi_sample_dropout_mean: num_samples must be >= 1");
  const at::Tensor input = x.contiguous();
  const int64_t n = input.numel(), step = (n + 3) / 4;
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  const int32_t threshold = keep_threshold(p);
  // regops.reference.dropout.float_round(dropout_scale(p) / K): the quotient rounded to float32.
  const float factor = static_cast<float>(static_cast<double>(dropout_scale(p)) / static_cast<double>(num_samples));
  REGOPS_CPU_FLOATING(input.scalar_type(), "multi_sample_dropout_mean", [&] {
    using C = typename Acc<T>::type;
    const T* xp = input.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    at::parallel_for(0, (n + kBlockElems - 1) / kBlockElems, std::max<int64_t>(1, kGrainBlocks / num_samples),
                     [&](int64_t begin, int64_t end) {
                       alignas(64) uint32_t words[kBlockElems];
                       alignas(64) int32_t count[kBlockElems];
                       for (int64_t b = begin; b < end; ++b) {
                         const int64_t first = b * kBlockElems, len = std::min(kBlockElems, n - first);
                         for (int64_t i = 0; i < kBlockElems; ++i) count[i] = 0;
                         for (int64_t k = 0; k < num_samples; ++k) {
                           philox_block(seed, offset + static_cast<uint64_t>(k * step + b * kBlockCounters), words);
                           for (int64_t i = 0; i < kBlockElems; ++i) count[i] += keep(words[i], threshold) ? 1 : 0;
                         }
                         for (int64_t i = 0; i < len; ++i) {
                           const C m = static_cast<C>(count[i]) * static_cast<C>(factor);
                           const C xv = static_cast<C>(xp[first + i]);
                           C out = xv * m;
                           // torch's mean of the K products x * mask_k: a NaN or Inf that some sample dropped gives
                           // NaN (Inf * 0), even when other samples kept it.
                           const C z = xv * static_cast<C>(0);
                           if (count[i] < num_samples && z != z) out = z;
                           yp[first + i] = static_cast<T>(out);
                         }
                       }
                     });
  });
  return y;
}

// y = x * scales[b] (+ residual), b the index along dim 0 (drop path's application step). Row b of x starts at
// x + b * x_step (x_step 0: every row reads the same one).
template <typename T, typename R>
void scale_rows(const T* __restrict__ x, int64_t x_step, const typename Acc<T>::type* __restrict__ scales,
                const R* __restrict__ res, T* __restrict__ y, int64_t batch, int64_t per) {
  using C = typename Acc<T>::type;
  at::parallel_for(0, batch, std::max<int64_t>(1, 65536 / std::max<int64_t>(per, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const C s = scales[b];
      const T* xb = x + b * x_step;
      T* yb = y + b * per;
      if (res) {
        const R* rb = res + b * per;
        for (int64_t i = 0; i < per; ++i) yb[i] = static_cast<T>(static_cast<C>(xb[i]) * s + static_cast<C>(rb[i]));
      } else {
        for (int64_t i = 0; i < per; ++i) yb[i] = static_cast<T>(static_cast<C>(xb[i]) * s);
      }
    }
  });
}

at::Tensor scale_rows_add_kernel(const at::Tensor& x, const at::Tensor& scales, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.device().is_cpu() && scales.device().is_cpu(), "regops::scale_rows_add: CPU tensors expected");
  TORCH_CHECK(x.dim() >= 1 && scales.numel() == x.size(0),
              "regops::scale_rows_add: scales must hold one value per row of x (", x.dim() ? x.size(0) : 0, ")");
  const bool broadcast = is_broadcast_value(x);  // every row reads one row of copies of the value
  const at::Tensor input = broadcast ? x : x.contiguous();
  const at::ScalarType cd = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor sc = scales.contiguous().to(cd);
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->device().is_cpu(),
                "regops::scale_rows_add: residual must match x's shape");
    // The reference adds residual.to(compute dtype): read it as x's dtype when it is, else converted once.
    res = residual->scalar_type() == input.scalar_type() ? residual->contiguous() : residual->contiguous().to(cd);
  }
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  const int64_t batch = input.size(0), per = batch ? input.numel() / batch : 0;
  if (input.numel() == 0) return y;
  REGOPS_CPU_FLOATING(input.scalar_type(), "scale_rows_add", [&] {
    using C = typename Acc<T>::type;
    const C* sp = sc.const_data_ptr<C>();
    std::vector<T> value_row(broadcast ? per : 0, broadcast ? input.const_data_ptr<T>()[0] : T(0));
    const T* xp = broadcast ? value_row.data() : input.const_data_ptr<T>();
    const int64_t step = broadcast ? 0 : per;
    if (!res.defined()) {
      scale_rows<T, T>(xp, step, sp, nullptr, y.mutable_data_ptr<T>(), batch, per);
    } else if (res.scalar_type() == input.scalar_type()) {
      scale_rows<T, T>(xp, step, sp, res.const_data_ptr<T>(), y.mutable_data_ptr<T>(), batch, per);
    } else {
      scale_rows<T, C>(xp, step, sp, res.const_data_ptr<C>(), y.mutable_data_ptr<T>(), batch, per);
    }
  });
  return y;
}

// regops.reference.dropout.nested_dropout: sample b (dim 0) keeps its first count_b units along dim, count_b =
// 1 + #{k : w_b < T_k}, w_b = word b of the stream, T_k = floor((1-p)^k 2^32) (geometric_thresholds: the same
// double pow and truncation as the reference's host floats); the rest is multiplied by 0 (NaN stays NaN).
at::Tensor nested_dropout_kernel(const at::Tensor& x, double p, int64_t dim, int64_t seed, int64_t offset) {
  const char* op = "nested_dropout";
  TORCH_CHECK(x.device().is_cpu(), "regops::nested_dropout: x must be a CPU tensor");
  TORCH_CHECK(x.dim() >= 2, "regops::nested_dropout: x must have a batch dim and a unit dim, got ", x.sizes());
  dim = at::maybe_wrap_dim(dim, x.dim());
  TORCH_CHECK(dim != 0, "regops::nested_dropout: dim must not be the batch dim 0");
  const at::Tensor input = x.contiguous();
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  const int64_t batch = input.size(0), units = input.size(dim);
  std::vector<uint32_t> thresholds;
  const double q = 1.0 - p;
  for (int64_t k = 1; k < units; ++k) {
    const int64_t t = static_cast<int64_t>(std::pow(q, static_cast<double>(k)) * 4294967296.0);
    if (t <= 0) break;
    thresholds.push_back(static_cast<uint32_t>(std::min<int64_t>(t, 4294967295LL)));
  }
  std::vector<int64_t> counts(batch, 1);
  for (int64_t b = 0; b < batch; b += 4) {
    const Words4 r = philox4x32_10(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + b / 4);
    for (int64_t j = 0; j < 4 && b + j < batch; ++j) {
      for (uint32_t t : thresholds) counts[b + j] += r.w[j] < t;
    }
  }
  if (input.numel() == 0) return y;
  const int64_t inner = input.stride(dim), outer = input.numel() / (batch * units * inner);
  REGOPS_CPU_FLOATING(input.scalar_type(), op, [&] {
    using C = typename Acc<T>::type;
    const T* xp = input.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    const int64_t rows = batch * outer;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainBlocks * kBlockElems / (units * inner)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t keep = counts[r / outer] * inner, len = units * inner;
        const T* a = xp + r * len;
        T* o = yp + r * len;
        for (int64_t i = 0; i < len; ++i) o[i] = static_cast<T>(static_cast<C>(a[i]) * (i < keep ? C(1) : C(0)));
      }
    });
  });
  return y;
}

// ------------------------------------------------------------------------------------------------ the ops
at::Tensor dropout(const at::Tensor& x, const at::Tensor& p, const at::Tensor& seed) {
  const HostSeed s = host_seed(seed, "dropout");
  return in_layout_of(x, dropout_kernel(x, probability(p, "dropout"), s.key, s.offset));
}

std::tuple<at::Tensor, at::Tensor> dropout_bitmask(const at::Tensor& x, const at::Tensor& p, const at::Tensor& seed) {
  const HostSeed s = host_seed(seed, "dropout_bitmask");
  auto [y, bits] = dropout_bitmask_kernel(x, probability(p, "dropout_bitmask"), s.key, s.offset);
  return {in_layout_of(x, y), bits};
}

at::Tensor apply_bitmask(const at::Tensor& g, const at::Tensor& bits, const at::Tensor& p) {
  return in_layout_of(g, apply_bitmask_kernel(g, bits, dropout_scale(probability(p, "apply_bitmask"))));
}

at::Tensor multi_sample_dropout_mean(const at::Tensor& x, const at::Tensor& p, int64_t num_samples,
                                     const at::Tensor& seed) {
  const HostSeed s = host_seed(seed, "multi_sample_dropout_mean");
  const double pv = probability(p, "multi_sample_dropout_mean");
  return in_layout_of(x, multi_sample_dropout_mean_kernel(x, pv, num_samples, s.key, s.offset));
}

at::Tensor scale_rows_add(const at::Tensor& x, const at::Tensor& scales, const std::optional<at::Tensor>& residual) {
  return in_layout_of(x, scale_rows_add_kernel(x, scales, residual));
}

// Stochastic depth: one dropout draw per sample (the mask of dropout(ones(B))), applied by scale_rows_add.
at::Tensor drop_path(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& p,
                     bool scale_by_keep, const at::Tensor& seed) {
  TORCH_CHECK(x.dim() >= 1, "regops::drop_path: x needs a batch dimension");
  const HostSeed s = host_seed(seed, "drop_path");
  const double pv = probability(p, "drop_path");
  const at::ScalarType cd = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // scales = dropout(ones(B)): 1 * (keep ? scale : 0) is (keep ? scale : 0) exactly; without scale_by_keep, 1 or 0.
  at::Tensor scales = at::empty({x.size(0)}, x.options().dtype(cd));
  const int32_t threshold = keep_threshold(pv);
  const float scale = scale_by_keep ? dropout_scale(pv) : 1.0f;
  REGOPS_CPU_FLOATING(cd, "drop_path", [&] {
    T* sp = scales.mutable_data_ptr<T>();
    for_each_block(x.size(0), s.key, s.offset, [&](int64_t, const uint32_t* words, int64_t first, int64_t len) {
      for (int64_t i = 0; i < len; ++i) sp[first + i] = keep(words[i], threshold) ? static_cast<T>(scale) : T(0);
    });
  });
  return in_layout_of(x, scale_rows_add_kernel(x, scales, residual));
}

at::Tensor nested_dropout(const at::Tensor& x, const at::Tensor& p, int64_t dim, const at::Tensor& seed) {
  const HostSeed s = host_seed(seed, "nested_dropout");
  return in_layout_of(x, nested_dropout_kernel(x, probability(p, "nested_dropout"), dim, s.key, s.offset));
}

}  // namespace
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("dropout", &regops::cpu::dropout);
  m.impl("dropout_bitmask", &regops::cpu::dropout_bitmask);
  m.impl("apply_bitmask", &regops::cpu::apply_bitmask);
  m.impl("multi_sample_dropout_mean", &regops::cpu::multi_sample_dropout_mean);
  m.impl("scale_rows_add", &regops::cpu::scale_rows_add);
  m.impl("nested_dropout", &regops::cpu::nested_dropout);
  m.impl("drop_path", &regops::cpu::drop_path);
}
