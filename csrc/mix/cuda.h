// Host launcher of the mixing kernel (csrc/mix/kernels.cu); bound to regops::mix_apply and regops::mix_apply_backward
// in csrc/mix/cuda.cpp.
#pragma once
#include "common/cuda_launch.h"

namespace regops {

// MixUp/CutMix: y[b] = x[b] blended with x[index[b]] outside its box, pasted inside; x, y hold
// [batch, per_sample] in NCHW order or, with channels_last, NHWC (inner = C); box is int64 [batch, 4]
// (y0, y1, x0, x1); transpose runs the backward (index = inverse partner permutation).
cudaError_t mix_launch(const void* x, void* y, int64_t batch, int64_t per_sample, int64_t inner, int64_t height,
                       int64_t width, bool channels_last, bool transpose, const float* w_self,
                       const float* w_other, const int64_t* index, const int64_t* box, DType dtype,
                       cudaStream_t stream);

}  // namespace regops
