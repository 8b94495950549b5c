// Dropout with the mask regenerated from (seed, offset): 16-byte vector loads/stores, one Philox call per
// four elements, the same element -> (counter, word) mapping as every other backend. Dropped elements are
// multiplied by 0, as in torch: a NaN or Inf there gives NaN.
#include "common/cuda_common.cuh"
#include "dropout/cuda.h"
#include "common/philox.cuh"

namespace regops {
namespace {

// Each thread handles a group of ELEMS consecutive elements: one 16-byte vector for 16/8-bit types,
// two for double; ELEMS is a multiple of 4 so a group covers whole Philox counters.
template <typename T>
__host__ __device__ constexpr int group_elems() {
  return 16 / sizeof(T) < 4 ? 4 : 16 / sizeof(T);
}

template <typename T, bool VECTOR>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, int32_t threshold,
                               float scale, const int64_t* __restrict__ seed_ptr) {
  // (key, first counter) from device memory: a CUDA-graph replay reads the seed its capture's RNG draw wrote.
  const uint64_t seed = static_cast<uint64_t>(seed_ptr[0]), offset = static_cast<uint64_t>(seed_ptr[1]);
  constexpr int ELEMS = group_elems<T>();
  constexpr int VEC = 16 / sizeof(T);
  using C = typename Compute<T>::type;
  const C s = static_cast<C>(scale);
  const int64_t groups = (n + ELEMS - 1) / ELEMS;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = g * ELEMS;
    uint32_t words[ELEMS];
#pragma unroll
    for (int k = 0; k < ELEMS / 4; ++k) {
      const Words4 r = philox4x32_10(seed, offset + static_cast<uint64_t>(base / 4 + k));
#pragma unroll
      for (int j = 0; j < 4; ++j) words[4 * k + j] = r.w[j];
    }
    if (VECTOR && base + ELEMS <= n) {
#pragma unroll
      for (int v = 0; v < ELEMS / VEC; ++v) {
        union {
          uint4 raw;
          T e[VEC];
        } in, out;
        in.raw = *reinterpret_cast<const uint4*>(x + base + v * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const int i = v * VEC + j;
          out.e[j] = from_compute<T>(to_compute(in.e[j]) * (keep(words[i], threshold) ? s : C(0)));
        }
        *reinterpret_cast<uint4*>(y + base + v * VEC) = out.raw;
      }
    } else {
#pragma unroll
      for (int i = 0; i < ELEMS; ++i) {
        if (base + i < n) {
          y[base + i] = from_compute<T>(to_compute(x[base + i]) * (keep(words[i], threshold) ? s : C(0)));
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch(const void* x, void* y, int64_t n, int32_t threshold, float scale, const int64_t* seed,
                   cudaStream_t stream) {
  constexpr int threads = 256;
  const int blocks = grid_size((n + group_elems<T>() - 1) / group_elems<T>(), threads);
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  if (aligned16(x) && aligned16(y)) {
    dropout_kernel<T, true><<<blocks, threads, 0, stream>>>(xt, yt, n, threshold, scale, seed);
  } else {
    dropout_kernel<T, false><<<blocks, threads, 0, stream>>>(xt, yt, n, threshold, scale, seed);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t dropout_launch(const void* x, void* y, int64_t n, DType dtype, int32_t threshold, float scale,
                           const int64_t* seed, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch<float>(x, y, n, threshold, scale, seed, stream);
    case DType::Float16:
      return launch<__half>(x, y, n, threshold, scale, seed, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(x, y, n, threshold, scale, seed, stream);
    case DType::Float64:
      return launch<double>(x, y, n, threshold, scale, seed, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace regops
