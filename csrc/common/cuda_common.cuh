// Element-type helpers shared by the .cu files: float compute, round-to-nearest-even stores, launch sizing.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace regops {

template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_compute(uint8_t v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T from_compute(typename Compute<T>::type v);
template <>
__device__ __forceinline__ float from_compute<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_compute<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_compute<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Streaming multiprocessors of the current device (the launch's: the ops run under a device guard), looked up
// once per device: a machine with different GPUs must not size every grid for the first one it saw.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 0 || device >= kMaxDevices) device = 0;
  int sms = cache[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 80;
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// Blocks for a grid-stride loop over `work` items: enough to fill the device, never more than needed.
inline int grid_size(int64_t work, int threads) {
  const int64_t max_blocks = int64_t{sm_count()} * 32;
  const int64_t needed = (work + threads - 1) / threads;
  return static_cast<int>(needed < max_blocks ? (needed > 0 ? needed : 1) : max_blocks);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace regops
