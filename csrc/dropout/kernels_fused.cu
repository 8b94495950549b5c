// residual + dropout(x + bias): forward and fused backward (dx and the bias gradient's partial column sums).
// Row layout, as regops.reference.dropout.row_keep_mask: element (r, c) takes word c % 4 of Philox counter
// offset + r * ceil(cols / 4) + c / 4. A thread owns one 4-column group (one Philox call) of one row at a time;
// a warp covers 32 consecutive groups of a row, so loads and stores are coalesced.
#include "common/cuda_common.cuh"
#include "dropout/cuda.h"
#include "common/philox.cuh"

namespace regops {
namespace {

constexpr int GROUPS_X = 32;  // 4-column groups per block (threadIdx.x)
constexpr int ROWS_Y = 8;     // rows per block step (threadIdx.y)

// Explicit round-to-nearest products and sums: never contracted into an FMA, so every backend rounds alike.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// Loads four consecutive elements starting at p (p + 4 may be past the row end: only `count` are read).
template <typename T, bool VECTOR>
__device__ __forceinline__ void load4(const T* p, int count, typename Compute<T>::type out[4]) {
  using C = typename Compute<T>::type;
  if (VECTOR && count == 4) {
    const Vec4<T> v = *reinterpret_cast<const Vec4<T>*>(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = to_compute(v.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = j < count ? to_compute(p[j]) : C(0);
  }
}

template <typename T, bool VECTOR>
__device__ __forceinline__ void store4(T* p, int count, const typename Compute<T>::type in[4]) {
  if (VECTOR && count == 4) {
    Vec4<T> v;
#pragma unroll
    for (int j = 0; j < 4; ++j) v.v[j] = from_compute<T>(in[j]);
    *reinterpret_cast<Vec4<T>*>(p) = v;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < count) p[j] = from_compute<T>(in[j]);
    }
  }
}

template <typename T, bool VECTOR>
__global__ void bias_dropout_add_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                            const T* __restrict__ residual, T* __restrict__ y, int64_t rows,
                                            int64_t cols, int32_t threshold, float scale,
                                            const int64_t* __restrict__ seed_ptr) {
  // (key, first counter) from device memory: a CUDA-graph replay reads the seed its capture's RNG draw wrote.
  const uint64_t seed = static_cast<uint64_t>(seed_ptr[0]), offset = static_cast<uint64_t>(seed_ptr[1]);
  using C = typename Compute<T>::type;
  const int64_t groups = (cols + 3) / 4;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * GROUPS_X + threadIdx.x;
  if (group >= groups) return;
  const int64_t c0 = 4 * group;
  const int count = static_cast<int>(cols - c0 < 4 ? cols - c0 : 4);
  const C s = static_cast<C>(scale);
  C b[4] = {C(0), C(0), C(0), C(0)};
  if (bias != nullptr) load4<T, VECTOR>(bias + c0, count, b);
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * ROWS_Y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * ROWS_Y) {
    const Words4 words = philox4x32_10(seed, offset + static_cast<uint64_t>(r * groups + group));
    const int64_t base = r * cols + c0;
    C xv[4], rv[4], out[4];
    load4<T, VECTOR>(x + base, count, xv);
    load4<T, VECTOR>(residual + base, count, rv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const C t = bias != nullptr ? add_rn(xv[j], b[j]) : xv[j];
      out[j] = add_rn(mul_rn(t, keep(words.w[j], threshold) ? s : C(0)), rv[j]);  // x * 0: NaN/Inf -> NaN
    }
    store4<T, VECTOR>(y + base, count, out);
  }
}

template <typename T, bool VECTOR>
__global__ void bias_dropout_add_bwd_kernel(const T* __restrict__ grad, T* __restrict__ dx,
                                            typename Compute<T>::type* __restrict__ dbias_partial, int64_t rows,
                                            int64_t cols, int32_t threshold, float scale,
                                            const int64_t* __restrict__ seed_ptr) {
  // (key, first counter) from device memory: a CUDA-graph replay reads the seed its capture's RNG draw wrote.
  const uint64_t seed = static_cast<uint64_t>(seed_ptr[0]), offset = static_cast<uint64_t>(seed_ptr[1]);
  using C = typename Compute<T>::type;
  __shared__ C sums[ROWS_Y][GROUPS_X * 4];
  const int64_t groups = (cols + 3) / 4;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * GROUPS_X + threadIdx.x;
  const int64_t c0 = 4 * group;
  const int count = group < groups ? static_cast<int>(cols - c0 < 4 ? cols - c0 : 4) : 0;
  const C s = static_cast<C>(scale);
  C acc[4] = {C(0), C(0), C(0), C(0)};
  if (count > 0) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * ROWS_Y + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * ROWS_Y) {
      const Words4 words = philox4x32_10(seed, offset + static_cast<uint64_t>(r * groups + group));
      const int64_t base = r * cols + c0;
      C gv[4], out[4];
      load4<T, VECTOR>(grad + base, count, gv);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        out[j] = mul_rn(gv[j], keep(words.w[j], threshold) ? s : C(0));
        acc[j] += out[j];
      }
      store4<T, VECTOR>(dx + base, count, out);
    }
  }
  if (dbias_partial == nullptr) return;
#pragma unroll
  for (int j = 0; j < 4; ++j) sums[threadIdx.y][threadIdx.x * 4 + j] = acc[j];
  __syncthreads();
  // Row y of the block reduces columns y, y + ROWS_Y, ... of the block's 128 columns over the ROWS_Y rows.
  for (int k = threadIdx.y * GROUPS_X + threadIdx.x; k < GROUPS_X * 4; k += GROUPS_X * ROWS_Y) {
    const int64_t c = static_cast<int64_t>(blockIdx.x) * GROUPS_X * 4 + k;
    if (c >= cols) continue;
    C total = C(0);
#pragma unroll
    for (int y = 0; y < ROWS_Y; ++y) total += sums[y][k];
    dbias_partial[static_cast<int64_t>(blockIdx.y) * cols + c] = total;
  }
}

template <typename T>
bool vector_ok(int64_t cols, std::initializer_list<const void*> ptrs) {
  if (cols % 4 != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) != 0) return false;
  }
  return true;
}

dim3 grid_for(int64_t rows, int64_t cols, int row_chunks) {
  const int64_t groups = (cols + 3) / 4;
  return dim3(static_cast<unsigned>((groups + GROUPS_X - 1) / GROUPS_X), static_cast<unsigned>(row_chunks));
}

template <typename T>
cudaError_t launch_fwd(const void* x, const void* bias, const void* residual, void* y, int64_t rows, int64_t cols,
                       int32_t threshold, float scale, const int64_t* seed, cudaStream_t stream) {
  const dim3 block(GROUPS_X, ROWS_Y);
  const dim3 grid = grid_for(rows, cols, bias_dropout_add_row_chunks(rows, cols));
  const T* xt = static_cast<const T*>(x);
  const T* bt = static_cast<const T*>(bias);
  const T* rt = static_cast<const T*>(residual);
  T* yt = static_cast<T*>(y);
  if (vector_ok<T>(cols, {x, bias, residual, y})) {
    bias_dropout_add_fwd_kernel<T, true>
        <<<grid, block, 0, stream>>>(xt, bt, rt, yt, rows, cols, threshold, scale, seed);
  } else {
    bias_dropout_add_fwd_kernel<T, false>
        <<<grid, block, 0, stream>>>(xt, bt, rt, yt, rows, cols, threshold, scale, seed);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* grad, void* dx, void* dbias_partial, int64_t rows, int64_t cols,
                       int32_t threshold, float scale, const int64_t* seed, int row_chunks,
                       cudaStream_t stream) {
  using C = typename Compute<T>::type;
  const dim3 block(GROUPS_X, ROWS_Y);
  const dim3 grid = grid_for(rows, cols, row_chunks);
  const T* gt = static_cast<const T*>(grad);
  T* dxt = static_cast<T*>(dx);
  C* part = static_cast<C*>(dbias_partial);
  if (vector_ok<T>(cols, {grad, dx})) {
    bias_dropout_add_bwd_kernel<T, true>
        <<<grid, block, 0, stream>>>(gt, dxt, part, rows, cols, threshold, scale, seed);
  } else {
    bias_dropout_add_bwd_kernel<T, false>
        <<<grid, block, 0, stream>>>(gt, dxt, part, rows, cols, threshold, scale, seed);
  }
  return cudaGetLastError();
}

}  // namespace

int bias_dropout_add_row_chunks(int64_t rows, int64_t cols) {
  const int64_t groups = (cols + 3) / 4;
  const int64_t col_blocks = (groups + GROUPS_X - 1) / GROUPS_X;
  const int64_t row_steps = (rows + ROWS_Y - 1) / ROWS_Y;
  // Enough blocks to fill the device (grid_size gives ~32 blocks per SM of 256 threads), no more than needed.
  const int64_t want = (grid_size(int64_t{1} << 40, GROUPS_X * ROWS_Y) + col_blocks - 1) / col_blocks;
  const int64_t chunks = want < row_steps ? want : row_steps;
  return static_cast<int>(chunks > 0 ? (chunks < 65535 ? chunks : 65535) : 1);
}

cudaError_t bias_dropout_add_launch(const void* x, const void* bias, const void* residual, void* y, int64_t rows,
                                    int64_t cols, DType dtype, int32_t threshold, float scale, const int64_t* seed,
                                    cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch_fwd<float>(x, bias, residual, y, rows, cols, threshold, scale, seed, stream);
    case DType::Float16:
      return launch_fwd<__half>(x, bias, residual, y, rows, cols, threshold, scale, seed, stream);
    case DType::BFloat16:
      return launch_fwd<__nv_bfloat16>(x, bias, residual, y, rows, cols, threshold, scale, seed, stream);
    case DType::Float64:
      return launch_fwd<double>(x, bias, residual, y, rows, cols, threshold, scale, seed, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t bias_dropout_add_backward_launch(const void* grad, void* dx, void* dbias_partial, int64_t rows,
                                             int64_t cols, DType dtype, int32_t threshold, float scale,
                                             const int64_t* seed, int row_chunks, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch_bwd<float>(grad, dx, dbias_partial, rows, cols, threshold, scale, seed, row_chunks,
                               stream);
    case DType::Float16:
      return launch_bwd<__half>(grad, dx, dbias_partial, rows, cols, threshold, scale, seed, row_chunks,
                                stream);
    case DType::BFloat16:
      return launch_bwd<__nv_bfloat16>(grad, dx, dbias_partial, rows, cols, threshold, scale, seed,
                                       row_chunks, stream);
    case DType::Float64:
      return launch_bwd<double>(grad, dx, dbias_partial, rows, cols, threshold, scale, seed, row_chunks,
                                stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace regops
