// Host launchers of the dropout family's plain-CUDA kernels (csrc/dropout/cuda*.cu); bound to the regops::
// operators in csrc/dropout/cuda.cpp.
#pragma once
#include "common/cuda_launch.h"

namespace regops {

// y = where(keep(philox(seed, offset + i / 4)[i % 4]), x * scale, 0) for i < n; x, y contiguous.
// `seed` points to the device int64 pair (key, first counter), read by the kernel (CUDA-graph safe).
cudaError_t dropout_launch(const void* x, void* y, int64_t n, DType dtype, int32_t threshold, float scale,
                           const int64_t* seed, cudaStream_t stream);

// y = residual + where(keep, (x + bias) * scale, 0) over [rows, cols] (csrc/dropout/kernels_fused.cu); bias may be
// null. Row layout: element (r, c) takes word c % 4 of counter offset + r * ceil(cols / 4) + c / 4.
cudaError_t bias_dropout_add_launch(const void* x, const void* bias, const void* residual, void* y, int64_t rows,
                                    int64_t cols, DType dtype, int32_t threshold, float scale, const int64_t* seed,
                                    cudaStream_t stream);
// dx = where(keep, grad * scale, 0); dbias_partial (nullable; float, double for Float64) gets [row_chunks, cols]
// partial column sums of dx, row_chunks = bias_dropout_add_row_chunks(rows, cols).
cudaError_t bias_dropout_add_backward_launch(const void* grad, void* dx, void* dbias_partial, int64_t rows,
                                             int64_t cols, DType dtype, int32_t threshold, float scale,
                                             const int64_t* seed, int row_chunks, cudaStream_t stream);
int bias_dropout_add_row_chunks(int64_t rows, int64_t cols);

}  // namespace regops
