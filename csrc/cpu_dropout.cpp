// C++ CPU kernels of the dropout ops (namespace regops_cpu, signatures of regops/reference/dropout.py):
// dropout, dropout_bitmask, apply_bitmask. Multiply semantics, as torch: y = x * (keep ? scale : 0) in float32
// (float64 for float64), rounded once to x's dtype, so a NaN or inf at a dropped position stays NaN.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"

namespace regops {
namespace cpu {

REGOPS_CPU_CLONES void philox_block(uint64_t seed, uint64_t first, uint32_t* __restrict__ words) {
  for (int64_t j = 0; j < kBlockCounters; ++j) {
    const Words4 r = philox4x32_10(seed, first + static_cast<uint64_t>(j));
    words[4 * j] = r.w[0];
    words[4 * j + 1] = r.w[1];
    words[4 * j + 2] = r.w[2];
    words[4 * j + 3] = r.w[3];
  }
}

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

at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.device().is_cpu(), "regops_cpu::dropout: x must be a CPU tensor");
  check_p(p, "dropout");
  const at::Tensor input = x.contiguous();
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  const int32_t threshold = keep_threshold(p);
  const float scale = dropout_scale(p);
  REGOPS_CPU_FLOATING(input.scalar_type(), "dropout", [&] {
    const T* xp = input.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    for_each_block(input.numel(), seed, offset, [&](int64_t, const uint32_t* words, int64_t first, int64_t len) {
      alignas(64) float m[kBlockElems];
      block_multipliers(words, threshold, scale, m);
      apply_block(xp + first, yp + first, m, len);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> dropout_bitmask(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.device().is_cpu(), "regops_cpu::dropout_bitmask: x must be a CPU tensor");
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

at::Tensor apply_bitmask(const at::Tensor& g, const at::Tensor& packed, double scale) {
  TORCH_CHECK(g.device().is_cpu() && packed.device().is_cpu(), "regops_cpu::apply_bitmask: CPU tensors expected");
  const int64_t n = g.numel();
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.numel() == (n + 7) / 8,
              "regops_cpu::apply_bitmask: the mask must be uint8 [ceil(numel / 8)] = [", (n + 7) / 8, "], got ",
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

}  // namespace
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops_cpu, CPU, m) {
  m.impl("dropout", &regops::cpu::dropout);
  m.impl("dropout_bitmask", &regops::cpu::dropout_bitmask);
  m.impl("apply_bitmask", &regops::cpu::apply_bitmask);
}
