// Host launchers of the plain-CUDA kernels (no torch headers here or in the .cu files: they build ~4x faster).
// csrc/regops.cpp checks tensors and calls these on the current stream.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace regops {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// y = where(keep(philox(seed, offset + i / 4)[i % 4]), x * scale, 0) for i < n; x, y contiguous.
cudaError_t dropout_launch(const void* x, void* y, int64_t n, DType dtype, int32_t threshold, float scale,
                           uint64_t seed, uint64_t offset, cudaStream_t stream);

}  // namespace regops
