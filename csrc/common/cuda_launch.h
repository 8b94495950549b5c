// What the plain-CUDA kernels (csrc/<family>/cuda*.cu, no torch headers: they build ~4x faster) and their torch
// bindings (csrc/<family>/cuda*.cpp) share: the element types a launcher takes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace regops {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3, UInt8 = 4 };

}  // namespace regops
