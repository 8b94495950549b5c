// Host launchers of the plain-CUDA kernels (no torch headers here or in the .cu files: they build ~4x faster).
// csrc/regops.cpp checks tensors and calls these on the current stream.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace regops {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3, UInt8 = 4 };

// y = where(keep(philox(seed, offset + i / 4)[i % 4]), x * scale, 0) for i < n; x, y contiguous.
// `seed` points to the device int64 pair (key, first counter), read by the kernel (CUDA-graph safe).
cudaError_t dropout_launch(const void* x, void* y, int64_t n, DType dtype, int32_t threshold, float scale,
                           const int64_t* seed, cudaStream_t stream);

// y = residual + where(keep, (x + bias) * scale, 0) over [rows, cols] (csrc/dropout_fused.cu); bias may be null.
// Row layout: element (r, c) takes word c % 4 of counter offset + r * ceil(cols / 4) + c / 4.
cudaError_t bias_dropout_add_launch(const void* x, const void* bias, const void* residual, void* y, int64_t rows,
                                    int64_t cols, DType dtype, int32_t threshold, float scale, const int64_t* seed,
                                    cudaStream_t stream);
// dx = where(keep, grad * scale, 0); dbias_partial (nullable; float, double for Float64) gets [row_chunks, cols]
// partial column sums of dx, row_chunks = bias_dropout_add_row_chunks(rows, cols).
cudaError_t bias_dropout_add_backward_launch(const void* grad, void* dx, void* dbias_partial, int64_t rows,
                                             int64_t cols, DType dtype, int32_t threshold, float scale,
                                             const int64_t* seed, int row_chunks, cudaStream_t stream);
int bias_dropout_add_row_chunks(int64_t rows, int64_t cols);

// MixUp/CutMix: y[b] = x[b] blended with x[index[b]] outside its box, pasted inside (csrc/mix.cu); x, y hold
// [batch, per_sample] in NCHW order or, with channels_last, NHWC (inner = C); box is int64 [batch, 4]
// (y0, y1, x0, x1); transpose runs the backward (index = inverse partner permutation).
cudaError_t mix_launch(const void* x, void* y, int64_t batch, int64_t per_sample, int64_t inner, int64_t height,
                       int64_t width, bool channels_last, bool transpose, const float* w_self,
                       const float* w_other, const int64_t* index, const int64_t* box, DType dtype,
                       cudaStream_t stream);

}  // namespace regops
