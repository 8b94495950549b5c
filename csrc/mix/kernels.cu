// MixUp / CutMix mixing kernel: every sample blended with (or boxed from) its partner in one launch, for every
// mode. The math is regops/mix/reference.py::mix_apply, operation by operation, with round-to-nearest multiplies
// and adds (no FMA contraction) so the results equal the reference bit for bit:
//
//   own   = (h, w) in box[b] ? 0 : x[b] * w_self[b]
//   other = (h, w) in box[c] ? x[o] : (w_other[c] != 0 ? x[o] * w_other[c] : 0)   (x[o] not read when unused)
//   y[b]  = own + other
//
// forward: o = partner[b], c = b;  transposed (the backward, partner a permutation): o = inverse[b], c = o.
#include "common/cuda_common.cuh"
#include "mix/cuda.h"

namespace regops {
namespace {

template <typename T>
__device__ __forceinline__ T store_value(typename Compute<T>::type v) {
  return from_compute<T>(v);
}
template <>
__device__ __forceinline__ uint8_t store_value<uint8_t>(float v) {
  // Round half to even (rintf under the default rounding mode), clamp to the uint8 range.
  return static_cast<uint8_t>(fminf(fmaxf(rintf(v), 0.0f), 255.0f));
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

struct Box {
  int64_t y0, y1, x0, x1;
  __device__ __forceinline__ bool contains(int64_t h, int64_t w) const {
    return h >= y0 && h < y1 && w >= x0 && w < x1;
  }
};

__device__ __forceinline__ Box load_box(const int64_t* box, int64_t s) {
  return Box{box[4 * s], box[4 * s + 1], box[4 * s + 2], box[4 * s + 3]};
}

template <typename T>
__global__ void mix_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t batch, int64_t per_sample,
                           int64_t inner, int64_t height, int64_t width, bool channels_last, bool transpose,
                           const float* __restrict__ w_self, const float* __restrict__ w_other,
                           const int64_t* __restrict__ index, const int64_t* __restrict__ box) {
  using C = typename Compute<T>::type;
  const int64_t plane = height * width;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t o = index[b];
    const int64_t c = transpose ? o : b;
    const C ws = static_cast<C>(w_self[b]);
    const float wo_f = w_other[c];
    const C wo = static_cast<C>(wo_f);
    const bool other_weighted = wo_f != 0.0f;
    const Box own_box = load_box(box, b);
    const Box other_box = load_box(box, c);
    const T* xs = x + b * per_sample;
    const T* xo = x + o * per_sample;
    T* ys = y + b * per_sample;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < per_sample;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t pix = channels_last ? i / inner : i % plane;
      const int64_t h = pix / width;
      const int64_t w = pix - h * width;
      const bool in_own = own_box.contains(h, w);
      const bool in_other = other_box.contains(h, w);
      C other = C(0);
      if (in_other || other_weighted) {
        const C xp = to_compute(xo[i]);
        other = in_other ? xp : mul_rn(xp, wo);
      }
      const C own = in_own ? C(0) : mul_rn(to_compute(xs[i]), ws);
      ys[i] = store_value<T>(add_rn(own, other));
    }
  }
}

template <typename T>
cudaError_t launch(const void* x, void* y, int64_t batch, int64_t per_sample, int64_t inner, int64_t height,
                   int64_t width, bool channels_last, bool transpose, const float* w_self, const float* w_other,
                   const int64_t* index, const int64_t* box, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t sample_blocks = (per_sample + threads - 1) / threads;
  const int64_t batch_blocks = batch < 65535 ? batch : 65535;
  // Enough blocks along x to fill the device when the batch is small, each thread a few elements otherwise.
  const int64_t want = (grid_size(sample_blocks * batch * threads, threads) + batch_blocks - 1) / batch_blocks;
  const int64_t x_blocks = want < sample_blocks ? (want > 0 ? want : 1) : sample_blocks;
  const dim3 grid(static_cast<unsigned>(x_blocks), static_cast<unsigned>(batch_blocks));
  mix_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), batch, per_sample, inner,
                                              height, width, channels_last, transpose, w_self, w_other, index,
                                              box);
  return cudaGetLastError();
}

}  // namespace

cudaError_t mix_launch(const void* x, void* y, int64_t batch, int64_t per_sample, int64_t inner, int64_t height,
                       int64_t width, bool channels_last, bool transpose, const float* w_self,
                       const float* w_other, const int64_t* index, const int64_t* box, DType dtype,
                       cudaStream_t stream) {
  if (batch == 0 || per_sample == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch<float>(x, y, batch, per_sample, inner, height, width, channels_last, transpose, w_self,
                           w_other, index, box, stream);
    case DType::Float16:
      return launch<__half>(x, y, batch, per_sample, inner, height, width, channels_last, transpose, w_self,
                            w_other, index, box, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(x, y, batch, per_sample, inner, height, width, channels_last, transpose,
                                   w_self, w_other, index, box, stream);
    case DType::Float64:
      return launch<double>(x, y, batch, per_sample, inner, height, width, channels_last, transpose, w_self,
                            w_other, index, box, stream);
    case DType::UInt8:
      return launch<uint8_t>(x, y, batch, per_sample, inner, height, width, channels_last, transpose, w_self,
                             w_other, index, box, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace regops
