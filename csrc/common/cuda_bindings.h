// Shared by the torch bindings of the CUDA kernels (csrc/<family>/cuda*.cpp): element type, launch errors and the
// device seed pointer the kernels read (CUDA-graph safe: never a host value frozen into a launch).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/cuda_launch.h"
#include "common/op_args.h"

namespace regops {

inline DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kDouble:
      return DType::Float64;
    default:
      TORCH_CHECK(false, "regops::", op, ": unsupported dtype ", t.scalar_type());
  }
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "regops::", op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// The int64 [2] (key, first counter) tensor on the op's device, where the kernels read it.
inline const int64_t* device_seed(const at::Tensor& seed, const at::Tensor& like, const char* op) {
  check_seed(seed, op);
  TORCH_CHECK(seed.device() == like.device(), "regops::", op, ": seed must be on ", like.device(), ", got ",
              seed.device());
  return seed.const_data_ptr<int64_t>();
}

}  // namespace regops
