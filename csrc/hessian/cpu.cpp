// C++ CPU kernels of the hessian family's ops (schemas in regops/hessian/ops.py, references in
// regops/hessian/reference.py): the Philox probes and the fused Hutchinson accumulation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "common/box_muller.h"
#include "common/cpu_common.h"

namespace regops {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------- probe_dot
// Per parameter p and probe k, dots[k, p] = <v_p[k], hv_p[k]>; per coordinate, diag = sum_k v[k] * hv[k] and
// diag_sq = sum_k (v[k] * hv[k])^2, over the parameters flattened and concatenated. One pass over v and hv.
// Coordinates are split into chunks fixed by the shape; each chunk's per-probe dot products are kept apart (in
// double) and added in chunk order, so the result does not depend on the thread count.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> hessian_probe_dot(at::TensorList vs, at::TensorList hvs,
                                                                 bool with_diag) {
  const char* op = "hessian_probe_dot";
  TORCH_CHECK(!vs.empty() && vs.size() == hvs.size(), "regops::hessian_probe_dot: vs and hvs must be non-empty "
              "lists of the same length");
  const at::ScalarType dtype = vs[0].scalar_type();
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t k = vs[0].dim() ? vs[0].size(0) : 0, params = static_cast<int64_t>(vs.size());
  int64_t total = 0;
  for (int64_t p = 0; p < params; ++p) {
    TORCH_CHECK(vs[p].device().is_cpu() && hvs[p].device().is_cpu(), "regops::", op, ": CPU tensors expected");
    TORCH_CHECK(vs[p].sizes() == hvs[p].sizes() && vs[p].dim() >= 1 && vs[p].size(0) == k,
                "regops::", op, ": v and hv of parameter ", p, " must have the same shape [K, ...], K = ", k);
    TORCH_CHECK(vs[p].scalar_type() == dtype && hvs[p].scalar_type() == dtype, "regops::", op,
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

// ---------------------------------------------------------------------------------------------- probes
// regops.hessian.reference.probes: the probe rows [K, S] of one call are the counters
// offset + first_probe * S / per + t, t = 0 .. K * S / per - 1, in order (per = 128 elements per counter for
// Rademacher, 4 for Gaussian), so the output is one flat run of counters split into blocks.
// The Gaussian transform repeats the reference's float32 operations one by one in the same order (no FMA: the
// build uses -ffp-contract=off), or operations that give the same bits for every input (each says why), so it
// gives the reference's bits.

using normal::kTwoPi;
using normal::kTwoPowM24;
using normal::log_unit;
using normal::radius;
using normal::sin_poly;

constexpr int64_t kPairs = kBlockElems / 2;

// Box-Muller on the word pairs (2i, 2i + 1) of a block (regops.hessian.reference.box_muller): z[2i], z[2i + 1].
// Two loops over the pairs that the compiler vectorizes whole on every ISA clone: the radius and the reduced
// angles (one loop reading both words of a pair: a loop reading every other word leaves its last vector's worth
// of pairs to a scalar epilogue), then the two sines. The radius's square root is one IEEE square-root
// instruction (the build's -fno-math-errno; correctly rounded: libm's bits). The angle's branches are selects of
// integers and exact constants. Inlined into each caller's ISA clones (gaussian_pairs, gaussian_add_f32).
__attribute__((always_inline)) inline void gaussian_pairs_inline(const uint32_t* __restrict__ words,
                                                                 float* __restrict__ z) {
  alignas(64) float r[kPairs], bc[kPairs], bs[kPairs];
  for (int64_t i = 0; i < kPairs; ++i) {
    r[i] = radius(log_unit((words[2 * i] >> 8) + 1));
    const int32_t k = static_cast<int32_t>(words[2 * i + 1] >> 8);
    const float u = static_cast<float>(k) * kTwoPowM24;
    const int32_t upper = k >> 23;                               // u >= 1/2
    const float t = u - static_cast<float>(upper);               // in [-1/2, 1/2), exact, never -0
    const float a = std::fabs(t);
    const int32_t inner = (k <= (1 << 22)) | (k >= (3 << 22));  // |t| <= 1/4
    bc[i] = (0.25f - a) * kTwoPi;
    // |t| <= 1/4: t; else sign(t)/2 - t. Both are h - s t: h = 0, s = -1 (0 - (-t) is t exactly, t being never
    // -0), or h = sign(t)/2, s = 1 (the reference's subtraction). h and s t are exact.
    const float h = static_cast<float>(1 - inner) * (0.5f - static_cast<float>(upper));
    bs[i] = (h - t * (1.0f - 2.0f * static_cast<float>(inner))) * kTwoPi;
  }
  for (int64_t i = 0; i < kPairs; ++i) {
    z[2 * i] = r[i] * sin_poly(bc[i]);
    z[2 * i + 1] = r[i] * sin_poly(bs[i]);
  }
}

REGOPS_CPU_CLONES void gaussian_pairs(const uint32_t* __restrict__ words, float* __restrict__ z) {
  gaussian_pairs_inline(words, z);
}

// float32 out of hessian_stream_add_ (its accumulation type is float32 too): y[i] += z[lo + i] * scale for
// i < len, the block's normals drawn and added in one clone (no buffer copy, the add at the clone's width).
REGOPS_CPU_CLONES void gaussian_add_f32(const uint32_t* __restrict__ words, float* __restrict__ y, int64_t lo,
                                        int64_t len, float scale) {
  alignas(64) float z[kBlockElems];
  gaussian_pairs_inline(words, z);
  const float* __restrict__ zb = z + lo;
  for (int64_t i = 0; i < len; ++i) y[i] = y[i] + zb[i] * scale;
}

// The fused add where there is one (float32 out): true when done.
template <typename T>
bool gaussian_add(const uint32_t*, T*, int64_t, int64_t, float) {
  return false;
}
inline bool gaussian_add(const uint32_t* words, float* y, int64_t lo, int64_t len, float scale) {
  gaussian_add_f32(words, y, lo, len, scale);
  return true;
}

template <typename T>
void gaussian_block(const uint32_t* __restrict__ words, T* __restrict__ out, int64_t len) {
  alignas(64) float z[kBlockElems];
  gaussian_pairs(words, z);
  for (int64_t i = 0; i < len; ++i) out[i] = static_cast<T>(z[i]);
}

// table[byte][j] = -1 if bit j of byte is set, else +1 (the reference's sign table).
template <typename T>
struct SignTable {
  alignas(64) T v[256][8];
  SignTable() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) v[b][j] = static_cast<T>(((b >> j) & 1) ? -1.0f : 1.0f);
  }
};

template <typename T>
void rademacher_block(const uint32_t* __restrict__ words, T* __restrict__ out, int64_t len, const SignTable<T>& table) {
  // Element 32 w + 8 b + j of the block is bit j of byte b (little-endian) of word w: -1 where set, else +1.
  const int64_t whole = len / 8;
  for (int64_t k = 0; k < whole; ++k) {
    std::memcpy(out + 8 * k, table.v[(words[k >> 2] >> (8 * (k & 3))) & 0xFF], 8 * sizeof(T));
  }
  for (int64_t i = 8 * whole; i < len; ++i) out[i] = table.v[(words[i >> 5] >> (8 * ((i >> 3) & 3))) & 0xFF][i & 7];
}

at::Tensor hessian_probes(const at::Tensor& seed, int64_t first_probe, int64_t num_probes, int64_t numel,
                          c10::string_view distribution, at::ScalarType dtype) {
  const char* op = "hessian_probes";
  const HostSeed sd = host_seed(seed, op);
  const bool gaussian = distribution == "gaussian";
  TORCH_CHECK(gaussian || distribution == "rademacher", "regops::", op,
              ": distribution must be one of ('rademacher', 'gaussian'), got '", std::string(distribution), "'");
  TORCH_CHECK(num_probes >= 0 && numel >= 0, "regops::", op, ": num_probes and numel must be >= 0");
  const int64_t per = gaussian ? 4 : 128;
  const int64_t stride = (numel + per - 1) / per * per, row_counters = stride / per;
  const int64_t n = num_probes * stride;
  // The reference computes counters in int64 and Philox takes them mod 2^64: the same here in uint64.
  const uint64_t first = static_cast<uint64_t>(sd.offset) +
                         static_cast<uint64_t>(first_probe) * static_cast<uint64_t>(row_counters);
  at::Tensor out = at::empty({num_probes, stride}, at::TensorOptions().dtype(dtype).device(at::kCPU));
  REGOPS_CPU_FLOATING(dtype, op, [&] {
    T* yp = out.mutable_data_ptr<T>();
    const int64_t block_elems = kBlockCounters * per;
    const int64_t blocks = (n + block_elems - 1) / block_elems;
    const int64_t grain = gaussian ? kGrainBlocks : std::max<int64_t>(1, kGrainBlocks / 32);
    const SignTable<T> table;
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      alignas(64) uint32_t words[kBlockElems];
      for (int64_t b = begin; b < end; ++b) {
        philox_block(static_cast<uint64_t>(sd.key), first + static_cast<uint64_t>(b * kBlockCounters), words);
        const int64_t start = b * block_elems, len = std::min(block_elems, n - start);
        if (gaussian) {
          gaussian_block<T>(words, yp + start, len);
        } else {
          rademacher_block<T>(words, yp + start, len, table);
        }
      }
    });
  });
  return out;
}

// regops.hessian.ops._stream_add: out[i] += T(float(z[start + i]) * float(scale)), added in out's accumulation
// type, z the probe stream's row 0 (drawn in float32). Blocks of kBlockCounters counters aligned on the stream, so
// the values are those of hessian_probes whatever start is; one pass over out, no buffer.
void hessian_stream_add_(const at::Tensor& out, const at::Tensor& seed, int64_t start, double scale,
                         c10::string_view distribution) {
  const char* op = "hessian_stream_add_";
  const HostSeed sd = host_seed(seed, op);
  const bool gaussian = distribution == "gaussian";
  TORCH_CHECK(gaussian || distribution == "rademacher", "regops::", op,
              ": distribution must be one of ('rademacher', 'gaussian'), got '", std::string(distribution), "'");
  TORCH_CHECK(out.is_contiguous(), "regops::", op, ": out must be contiguous");
  TORCH_CHECK(start >= 0, "regops::", op, ": start must be >= 0");
  const int64_t n = out.numel();
  if (n == 0) return;
  const int64_t block_elems = kBlockCounters * (gaussian ? 4 : 128);
  const int64_t first_block = start / block_elems, last_block = (start + n - 1) / block_elems;
  const float scale_f = static_cast<float>(scale);
  REGOPS_CPU_FLOATING(out.scalar_type(), op, [&] {
    using C = typename Acc<T>::type;
    T* yp = out.mutable_data_ptr<T>();
    const SignTable<float> table;
    const int64_t grain = gaussian ? kGrainBlocks : std::max<int64_t>(1, kGrainBlocks / 32);
    at::parallel_for(first_block, last_block + 1, grain, [&](int64_t begin, int64_t end) {
      alignas(64) uint32_t words[kBlockElems];
      std::vector<float> z(block_elems);
      for (int64_t b = begin; b < end; ++b) {
        philox_block(static_cast<uint64_t>(sd.key), static_cast<uint64_t>(sd.offset) + b * kBlockCounters, words);
        // this block's elements of out: stream elements [lo, hi) are out[lo - start, hi - start)
        const int64_t lo = std::max(b * block_elems, start), hi = std::min((b + 1) * block_elems, start + n);
        T* y = yp + (lo - start);
        if (gaussian && gaussian_add(words, y, lo - b * block_elems, hi - lo, scale_f)) continue;
        if (gaussian) {
          gaussian_block<float>(words, z.data(), block_elems);
        } else {
          rademacher_block<float>(words, z.data(), block_elems, table);
        }
        const float* zb = z.data() + (lo - b * block_elems);
        for (int64_t i = 0; i < hi - lo; ++i) {
          y[i] = static_cast<T>(static_cast<C>(y[i]) + static_cast<C>(static_cast<T>(zb[i] * scale_f)));
        }
      }
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace regops

// hessian_probes has no floating tensor input: the dispatcher picks this kernel by its seed tensor's device.
TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("hessian_probes", &regops::cpu::hessian_probes);
  m.impl("hessian_probe_dot", &regops::cpu::hessian_probe_dot);
  m.impl("hessian_stream_add_", &regops::cpu::hessian_stream_add_);
}
