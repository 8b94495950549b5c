// C++ CPU kernels of the fused dropout ops, registered on the regops:: operators (schemas in
// regops/dropout/ops.py): bias_dropout_add and its backward, dropout_add_layer_norm (LayerNorm / RMSNorm) and its
// backward.
//
// Row layout (regops.reference.dropout.row_keep_mask): element (r, c) of [rows, cols] takes word c % 4 of counter
// offset + r * rc + c / 4, rc = ceil(cols / 4). The counters of consecutive rows are consecutive, so a group of
// rows is one contiguous range of counters: its words are generated in one vectorized pass, each row's words at
// 4 * rc * (row in group). Multiply semantics, as torch: dropout(t) = t * (keep ? scale : 0).
// Column sums (bias, weight gradients) are accumulated in double over a split of the rows fixed by the shape
// alone, then added in order: the same result with any number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common/cpu_common.h"

namespace regops {
namespace cpu {
namespace {

// Counters generated per group of rows (a group holds at least one whole row).
constexpr int64_t kGroupCounters = 1024;

int64_t row_counters(int64_t cols) { return (cols + 3) / 4; }

// words[4 * j + k] = word k of counter first + j, j < count.
void fill_words(uint64_t seed, uint64_t first, int64_t count, uint32_t* words) {
  int64_t j = 0;
  for (; j + kBlockCounters <= count; j += kBlockCounters) philox_block(seed, first + j, words + 4 * j);
  for (; j < count; ++j) {
    const Words4 r = philox4x32_10(seed, first + static_cast<uint64_t>(j));
    for (int k = 0; k < 4; ++k) words[4 * j + k] = r.w[k];
  }
}

// Philox words of rows [r0, r1) in the padded row layout: words[(r - r0) * 4 * rc + c]; the row loops turn
// them into multipliers (keep ? scale : 0) inline, where the compiler vectorizes the compare and select.
struct RowMask {
  uint64_t seed, offset;
  int64_t rc;
  int32_t threshold;
  float scale;
  bool active;  // p > 0: otherwise every multiplier is 1 and nothing is generated
  std::vector<uint32_t> words;

  RowMask(uint64_t seed_, uint64_t offset_, int64_t cols, double p, bool active_)
      : seed(seed_), offset(offset_), rc(row_counters(cols)), threshold(keep_threshold(p)),
        scale(dropout_scale(p)), active(active_) {}

  // Rows per group: as many whole rows as fit in kGroupCounters (at least one).
  int64_t group_rows() const { return std::max<int64_t>(1, kGroupCounters / std::max<int64_t>(rc, 1)); }

  const uint32_t* fill(int64_t r0, int64_t r1) {
    const int64_t count = (r1 - r0) * rc;
    words.resize(4 * count);
    fill_words(seed, offset + static_cast<uint64_t>(r0 * rc), count, words.data());
    return words.data();
  }
};

// The multiplier of one element: the mask times the scale, as a float (cast to C by the caller).
inline float mult(uint32_t word, int32_t threshold, float scale) { return keep(word, threshold) ? scale : 0.0f; }

// y = (x [+ b]) * m + r over one row.
template <typename T, typename C>
inline void bda_row(const T* __restrict__ x, const C* __restrict__ b, const T* __restrict__ r, T* __restrict__ y,
                    const uint32_t* __restrict__ w, int64_t cols, int32_t threshold, float scale) {
  if (b) {
    for (int64_t c = 0; c < cols; ++c) {
      const C t = static_cast<C>(x[c]) + b[c];
      y[c] = static_cast<T>(t * static_cast<C>(mult(w[c], threshold, scale)) + static_cast<C>(r[c]));
    }
  } else {
    for (int64_t c = 0; c < cols; ++c) {
      const C t = static_cast<C>(x[c]) * static_cast<C>(mult(w[c], threshold, scale));
      y[c] = static_cast<T>(t + static_cast<C>(r[c]));
    }
  }
}

// dx = g * m over one row, column sums of dx (before rounding) added to sums when given.
template <typename T, typename C>
inline void bda_backward_row(const T* __restrict__ g, T* __restrict__ dx, double* __restrict__ sums,
                             const uint32_t* __restrict__ w, int64_t cols, int32_t threshold, float scale) {
  if (sums) {
    for (int64_t c = 0; c < cols; ++c) {
      const C v = static_cast<C>(g[c]) * static_cast<C>(mult(w[c], threshold, scale));
      dx[c] = static_cast<T>(v);
      sums[c] += static_cast<double>(v);
    }
  } else {
    for (int64_t c = 0; c < cols; ++c) {
      dx[c] = static_cast<T>(static_cast<C>(g[c]) * static_cast<C>(mult(w[c], threshold, scale)));
    }
  }
}

// Rows split into chunks fixed by the shape (about 64K elements each): the unit of parallel column sums.
int64_t row_chunks(int64_t rows, int64_t cols) {
  const int64_t per = std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1));
  return std::max<int64_t>(1, (rows + per - 1) / per);
}

void check_rows(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), "regops::", op, ": ", what, " must be a CPU tensor");
}

// ------------------------------------------------------------------------------------------------ bias_dropout_add
at::Tensor bias_dropout_add_kernel(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                            double p, int64_t seed, int64_t offset) {
  const char* op = "bias_dropout_add";
  check_rows(x, "x", op);
  check_rows(residual, "residual", op);
  check_p(p, op);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "regops::bias_dropout_add: residual must match x's shape and dtype");
  const int64_t cols = x.dim() ? x.size(-1) : 1, rows = cols ? x.numel() / cols : 0;
  const at::Tensor input = x.contiguous(), res = residual.contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    check_rows(*bias, "bias", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cols, "regops::bias_dropout_add: bias must be [", cols,
                "], got ", bias->sizes());
    b = bias->contiguous().to(input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  }
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (rows == 0 || cols == 0) return y;
  REGOPS_CPU_FLOATING(input.scalar_type(), op, [&] {
    using C = typename Acc<T>::type;
    const T *xp = input.const_data_ptr<T>(), *rp = res.const_data_ptr<T>();
    const C* bp = b.defined() ? b.const_data_ptr<C>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    RowMask proto(seed, offset, cols, p, true);
    const int64_t group = proto.group_rows();
    at::parallel_for(0, (rows + group - 1) / group, std::max<int64_t>(1, 65536 / (group * cols)),
                     [&](int64_t g0, int64_t g1) {
                       RowMask mask(seed, offset, cols, p, true);
                       const int32_t threshold = mask.threshold;
                       const float scale = mask.scale;
                       for (int64_t g = g0; g < g1; ++g) {
                         const int64_t r0 = g * group, r1 = std::min(rows, r0 + group);
                         const uint32_t* w = mask.fill(r0, r1);
                         for (int64_t r = r0; r < r1; ++r) {
                           bda_row<T, C>(xp + r * cols, bp, rp + r * cols, yp + r * cols,
                                         w + (r - r0) * 4 * mask.rc, cols, threshold, scale);
                         }
                       }
                     });
  });
  return y;
}

std::tuple<at::Tensor, std::optional<at::Tensor>> bias_dropout_add_backward_kernel(const at::Tensor& grad, bool has_bias,
                                                                            double p, int64_t seed,
                                                                            int64_t offset) {
  const char* op = "bias_dropout_add_backward";
  check_rows(grad, "grad", op);
  check_p(p, op);
  const bool broadcast = is_broadcast_value(grad);  // every row reads one row of copies of the value
  const at::Tensor g = broadcast ? grad : grad.contiguous();
  const int64_t cols = g.dim() ? g.size(-1) : 1, rows = cols ? g.numel() / cols : 0;
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dx = at::empty_like(g, at::MemoryFormat::Contiguous);
  std::optional<at::Tensor> dbias;
  if (has_bias) dbias = at::zeros({cols}, g.options().dtype(acc));
  if (rows == 0 || cols == 0) return {dx, dbias};
  const int64_t chunks = row_chunks(rows, cols), per = (rows + chunks - 1) / chunks;
  std::vector<double> partial(has_bias ? chunks * cols : 0, 0.0);
  REGOPS_CPU_FLOATING(g.scalar_type(), op, [&] {
    using C = typename Acc<T>::type;
    std::vector<T> value_row(broadcast ? cols : 0, broadcast ? g.const_data_ptr<T>()[0] : T(0));
    const T* gp = broadcast ? value_row.data() : g.const_data_ptr<T>();
    const int64_t g_step = broadcast ? 0 : cols;
    T* dp = dx.mutable_data_ptr<T>();
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      RowMask mask(seed, offset, cols, p, true);
      const int32_t threshold = mask.threshold;
      const float scale = mask.scale;
      const int64_t group = mask.group_rows();
      for (int64_t k = k0; k < k1; ++k) {
        double* sums = has_bias ? partial.data() + k * cols : nullptr;
        const int64_t end = std::min(rows, (k + 1) * per);
        for (int64_t r0 = k * per; r0 < end; r0 += group) {
          const int64_t r1 = std::min(end, r0 + group);
          const uint32_t* w = mask.fill(r0, r1);
          for (int64_t r = r0; r < r1; ++r) {
            bda_backward_row<T, C>(gp + r * g_step, dp + r * cols, sums, w + (r - r0) * 4 * mask.rc, cols,
                                   threshold, scale);
          }
        }
      }
    });
    if (has_bias) {
      C* db = dbias->mutable_data_ptr<C>();
      for (int64_t c = 0; c < cols; ++c) {
        double total = 0.0;
        for (int64_t k = 0; k < chunks; ++k) total += partial[k * cols + c];
        db[c] = static_cast<C>(total);
      }
    }
  });
  return {dx, dbias};
}

// ------------------------------------------------------------------------------------------------ + LayerNorm
// sum_{i < n} f(i) in double with 8 independent accumulators (a fixed order the compiler can vectorize).
template <typename F>
inline double lane_sum(int64_t n, const F& f) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += f(i + j);
  }
  double tail = 0.0;
  for (; i < n; ++i) tail += f(i);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// One row: t = x * m (+ residual), s = round_S(t), then the norm of the stored s in C (statistics accumulated
// in double); v is scratch for the row. Returns (mean, rstd).
template <typename T, typename S, typename C>
inline std::pair<C, C> daln_row(const T* __restrict__ x, const S* __restrict__ res, const C* __restrict__ w,
                                const C* __restrict__ b, T* __restrict__ y, S* __restrict__ s, C* __restrict__ v,
                                const uint32_t* __restrict__ words, int64_t cols, int32_t threshold, float scale,
                                double eps, bool rms_norm) {
  if (words) {
    for (int64_t c = 0; c < cols; ++c) v[c] = static_cast<C>(x[c]) * static_cast<C>(mult(words[c], threshold, scale));
  } else {
    for (int64_t c = 0; c < cols; ++c) v[c] = static_cast<C>(x[c]);
  }
  if (res) {
    for (int64_t c = 0; c < cols; ++c) v[c] = v[c] + static_cast<C>(res[c]);
  }
  for (int64_t c = 0; c < cols; ++c) {
    s[c] = static_cast<S>(v[c]);
    v[c] = static_cast<C>(s[c]);  // the norm is of the stored s
  }
  const double mu = rms_norm ? 0.0 : lane_sum(cols, [&](int64_t c) { return static_cast<double>(v[c]); }) / cols;
  const double var = lane_sum(cols, [&](int64_t c) {
                       const double d = static_cast<double>(v[c]) - mu;
                       return d * d;
                     }) / cols;
  const C mean_c = static_cast<C>(mu);
  const C rstd_c = C(1) / std::sqrt(static_cast<C>(var) + static_cast<C>(eps));
  for (int64_t c = 0; c < cols; ++c) {
    C out = (v[c] - mean_c) * rstd_c;
    if (w) out = out * w[c];
    if (b) out = out + b[c];
    y[c] = static_cast<T>(out);
  }
  return {mean_c, rstd_c};
}

template <typename T, typename S>
void daln_forward(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w, const at::Tensor& b,
                  at::Tensor& y, at::Tensor& s, at::Tensor& mean, at::Tensor& rstd, double p, double eps,
                  bool rms_norm, int64_t seed, int64_t offset) {
  using C = typename Acc<T>::type;
  const int64_t cols = x.size(-1), rows = x.numel() / cols;
  const T* xp = x.const_data_ptr<T>();
  const S* rp = res.defined() ? res.const_data_ptr<S>() : nullptr;
  const C* wp = w.defined() ? w.const_data_ptr<C>() : nullptr;
  const C* bp = b.defined() ? b.const_data_ptr<C>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  S* sp = s.mutable_data_ptr<S>();
  C *mp = mean.mutable_data_ptr<C>(), *rsp = rstd.mutable_data_ptr<C>();
  const bool dropout = p > 0.0;
  RowMask proto(seed, offset, cols, p, dropout);
  const int64_t group = proto.group_rows();
  const int32_t threshold = proto.threshold;
  const float scale = proto.scale;
  at::parallel_for(0, (rows + group - 1) / group, std::max<int64_t>(1, 32768 / (group * cols)),
                   [&](int64_t g0, int64_t g1) {
    RowMask mask(seed, offset, cols, p, dropout);
    std::vector<C> row(cols);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * group, r1 = std::min(rows, r0 + group);
      const uint32_t* words = dropout ? mask.fill(r0, r1) : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* wr = words ? words + (r - r0) * 4 * mask.rc : nullptr;
        const auto [mean_c, rstd_c] = daln_row<T, S, C>(xp + r * cols, rp ? rp + r * cols : nullptr, wp, bp,
                                                         yp + r * cols, sp + r * cols, row.data(), wr, cols,
                                                         threshold, scale, eps, rms_norm);
        mp[r] = mean_c;
        rsp[r] = rstd_c;
      }
    }
  });
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_kernel(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, double eps, bool rms_norm, bool residual_in_fp32,
    int64_t seed, int64_t offset) {
  const char* op = "dropout_add_layer_norm";
  check_rows(x, "x", op);
  check_p(p, op);
  TORCH_CHECK(x.dim() >= 1, "regops::dropout_add_layer_norm: x must have at least one dimension");
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  const at::ScalarType cd = acc_of(x.scalar_type());
  const at::ScalarType s_dtype = residual_in_fp32 && x.scalar_type() != at::kDouble
                                     ? at::kFloat
                                     : (residual.has_value() ? residual->scalar_type() : x.scalar_type());
  const at::Tensor input = x.contiguous();
  at::Tensor res, w, b;
  if (residual.has_value()) {
    check_rows(*residual, "residual", op);
    TORCH_CHECK(residual->sizes() == x.sizes(), "regops::dropout_add_layer_norm: residual must match x's shape");
    res = residual->contiguous().to(s_dtype);  // exact: the same dtype, or an upcast to float32
  }
  auto param = [&](const std::optional<at::Tensor>& t, const char* what) {
    if (!t.has_value()) return at::Tensor();
    check_rows(*t, what, op);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == cols, "regops::dropout_add_layer_norm: ", what, " must be [",
                cols, "], got ", t->sizes());
    return t->contiguous().to(cd);
  };
  w = param(weight, "weight");
  b = param(bias, "bias");
  at::Tensor y = at::empty_like(input, at::MemoryFormat::Contiguous);
  at::Tensor s = at::empty(input.sizes(), input.options().dtype(s_dtype));
  at::Tensor mean = at::empty({rows}, input.options().dtype(cd)), rstd = at::empty({rows}, input.options().dtype(cd));
  if (rows == 0 || cols == 0) return {y, s, mean, rstd};
  REGOPS_CPU_FLOATING(input.scalar_type(), op, [&] {
    using X = T;
    REGOPS_CPU_FLOATING(s_dtype, op, [&] {
      daln_forward<X, T>(input, res, w, b, y, s, mean, rstd, p, eps, rms_norm, seed, offset);
    });
  });
  return {y, s, mean, rstd};
}

// The first pass of a backward row: xhat, wg and the column sums of dweight, dbias.
template <typename T, typename S, typename C>
inline void daln_backward_stats(const T* __restrict__ g, const S* __restrict__ s, const C* __restrict__ w,
                                C* __restrict__ xhat, C* __restrict__ wg, double* __restrict__ sw,
                                double* __restrict__ sb, int64_t cols, C mu, C rs) {
  for (int64_t c = 0; c < cols; ++c) {
    const C gc = static_cast<C>(g[c]);
    xhat[c] = (static_cast<C>(s[c]) - mu) * rs;
    wg[c] = w ? gc * w[c] : gc;
  }
  if (sw) {
    for (int64_t c = 0; c < cols; ++c) sw[c] += static_cast<double>(static_cast<C>(g[c]) * xhat[c]);
  }
  if (sb) {
    for (int64_t c = 0; c < cols; ++c) sb[c] += static_cast<double>(static_cast<C>(g[c]));
  }
}

// The second pass of a backward row: dsum from the row's (xhat, wg) and statistics c1, c2; dx = dsum * m.
template <typename T, typename S, typename C>
inline void daln_backward_row(const C* __restrict__ xhat, const C* __restrict__ wg, const S* __restrict__ ds,
                              T* __restrict__ dx, C* __restrict__ dres, const uint32_t* __restrict__ words,
                              int64_t cols, C c1, C c2, C rs, bool rms_norm, int32_t threshold, float scale) {
  for (int64_t c = 0; c < cols; ++c) {
    C d = rms_norm ? (wg[c] - xhat[c] * c1) * rs : (wg[c] - xhat[c] * c1 - c2) * rs;
    if (ds) d = d + static_cast<C>(ds[c]);
    if (dres) dres[c] = d;
    dx[c] = static_cast<T>(words ? d * static_cast<C>(mult(words[c], threshold, scale)) : d);
  }
}

// One row: xhat = (s - mean) * rstd, wg = dy * w, dsum = (wg - xhat * mean(xhat * wg) [- mean(wg)]) * rstd
// (+ ds), dx = dsum * m; dweight += dy * xhat, dbias += dy over rows.
template <typename T, typename S>
void daln_backward(const at::Tensor& dy, const at::Tensor& ds, const at::Tensor& s, const at::Tensor& mean,
                   const at::Tensor& rstd, const at::Tensor& w, bool has_bias, double p, bool rms_norm, int64_t seed,
                   int64_t offset, at::Tensor& dx, at::Tensor& dres, at::Tensor& dw, at::Tensor& db) {
  using C = typename Acc<T>::type;
  const int64_t cols = s.size(-1), rows = s.numel() / cols;
  const bool broadcast = is_broadcast_value(dy);  // every row reads one row of copies of the value
  std::vector<T> dy_row(broadcast ? cols : 0, broadcast ? dy.const_data_ptr<T>()[0] : T(0));
  const T* gp = broadcast ? dy_row.data() : dy.const_data_ptr<T>();
  const int64_t g_step = broadcast ? 0 : cols;
  const S* dsp = ds.defined() ? ds.const_data_ptr<S>() : nullptr;
  const S* sp = s.const_data_ptr<S>();
  const C *mp = mean.const_data_ptr<C>(), *rsp = rstd.const_data_ptr<C>();
  const C* wp = w.defined() ? w.const_data_ptr<C>() : nullptr;
  T* dxp = dx.mutable_data_ptr<T>();
  C* drp = dres.defined() ? dres.mutable_data_ptr<C>() : nullptr;
  const bool dropout = p > 0.0, want_dw = w.defined();
  const int64_t chunks = row_chunks(rows, cols), per = (rows + chunks - 1) / chunks;
  std::vector<double> pw(want_dw ? chunks * cols : 0, 0.0), pb(has_bias ? chunks * cols : 0, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    RowMask mask(seed, offset, cols, p, dropout);
    const int32_t threshold = mask.threshold;
    const float scale = mask.scale;
    const int64_t group = mask.group_rows();
    std::vector<C> xhat(cols), wg(cols);
    for (int64_t k = k0; k < k1; ++k) {
      double* sw = want_dw ? pw.data() + k * cols : nullptr;
      double* sb = has_bias ? pb.data() + k * cols : nullptr;
      const int64_t end = std::min(rows, (k + 1) * per);
      for (int64_t r0 = k * per; r0 < end; r0 += group) {
        const int64_t r1 = std::min(end, r0 + group);
        const uint32_t* words = dropout ? mask.fill(r0, r1) : nullptr;
        for (int64_t r = r0; r < r1; ++r) {
          const T* gr = gp + r * g_step;
          const S* sr = sp + r * cols;
          const C mu = mp[r], rs = rsp[r];
          daln_backward_stats<T, S, C>(gr, sr, wp, xhat.data(), wg.data(), sw, sb, cols, mu, rs);
          const double c1 = lane_sum(cols, [&](int64_t c) { return static_cast<double>(xhat[c]) * wg[c]; });
          const double c2 = rms_norm ? 0.0 : lane_sum(cols, [&](int64_t c) { return static_cast<double>(wg[c]); });
          const C c1c = static_cast<C>(c1 / cols), c2c = rms_norm ? C(0) : static_cast<C>(c2 / cols);
          daln_backward_row<T, S, C>(xhat.data(), wg.data(), dsp ? dsp + r * cols : nullptr, dxp + r * cols,
                                     drp ? drp + r * cols : nullptr,
                                     words ? words + (r - r0) * 4 * mask.rc : nullptr, cols, c1c, c2c, rs,
                                     rms_norm, threshold, scale);
        }
      }
    }
  });
  auto reduce = [&](const std::vector<double>& part, at::Tensor& out) {
    C* o = out.mutable_data_ptr<C>();
    for (int64_t c = 0; c < cols; ++c) {
      double total = 0.0;
      for (int64_t k = 0; k < chunks; ++k) total += part[k * cols + c];
      o[c] = static_cast<C>(total);
    }
  };
  if (want_dw) reduce(pw, dw);
  if (has_bias) reduce(pb, db);
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
dropout_add_layer_norm_backward_kernel(const at::Tensor& dy, const std::optional<at::Tensor>& ds, const at::Tensor& s,
                                const at::Tensor& mean, const at::Tensor& rstd,
                                const std::optional<at::Tensor>& weight, bool has_bias, double p, bool rms_norm,
                                int64_t seed, int64_t offset, at::ScalarType x_dtype,
                                std::optional<at::ScalarType> res_dtype) {
  const char* op = "dropout_add_layer_norm_backward";
  check_rows(s, "s", op);
  check_p(p, op);
  TORCH_CHECK(s.dim() >= 1 && dy.sizes() == s.sizes(), "regops::dropout_add_layer_norm_backward: dy must match s");
  const int64_t cols = s.size(-1), rows = cols ? s.numel() / cols : 0;
  const at::ScalarType cd = acc_of(x_dtype);
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows,
              "regops::dropout_add_layer_norm_backward: mean and rstd must have one value per row");
  const at::Tensor g = is_broadcast_value(dy) && dy.scalar_type() == x_dtype ? dy : dy.contiguous().to(x_dtype);
  const at::Tensor sc = s.contiguous();
  const at::Tensor mu = mean.contiguous().to(cd), rs = rstd.contiguous().to(cd);
  at::Tensor dsc;
  if (ds.has_value()) {
    TORCH_CHECK(ds->sizes() == s.sizes(), "regops::dropout_add_layer_norm_backward: ds must match s");
    dsc = ds->contiguous().to(s.scalar_type());
  }
  at::Tensor w;
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == cols,
                "regops::dropout_add_layer_norm_backward: weight must be [", cols, "]");
    w = weight->contiguous().to(cd);
  }
  at::Tensor dx = at::empty(s.sizes(), s.options().dtype(x_dtype));
  at::Tensor dres = res_dtype.has_value() ? at::empty(s.sizes(), s.options().dtype(cd)) : at::Tensor();
  at::Tensor dw = w.defined() ? at::zeros({cols}, s.options().dtype(cd)) : at::Tensor();
  at::Tensor db = has_bias ? at::zeros({cols}, s.options().dtype(cd)) : at::Tensor();
  if (rows > 0 && cols > 0) {
    REGOPS_CPU_FLOATING(x_dtype, op, [&] {
      using X = T;
      REGOPS_CPU_FLOATING(sc.scalar_type(), op, [&] {
        daln_backward<X, T>(g, dsc, sc, mu, rs, w, has_bias, p, rms_norm, seed, offset, dx, dres, dw, db);
      });
    });
  }
  std::optional<at::Tensor> dres_out, dw_out, db_out;
  if (res_dtype.has_value()) dres_out = dres.to(*res_dtype);
  if (w.defined()) dw_out = dw;
  if (has_bias) db_out = db;
  return {dx, dres_out, dw_out, db_out};
}

// ------------------------------------------------------------------------------------------------ the ops
at::Tensor bias_dropout_add(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                            const at::Tensor& p, const at::Tensor& seed) {
  const HostSeed sd = host_seed(seed, "bias_dropout_add");
  const double pv = probability(p, "bias_dropout_add");
  return in_layout_of(x, bias_dropout_add_kernel(x, bias, residual, pv, sd.key, sd.offset));
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad, bool has_bias,
                                                             const at::Tensor& p, const at::Tensor& seed) {
  const HostSeed sd = host_seed(seed, "bias_dropout_add_backward");
  const double pv = probability(p, "bias_dropout_add_backward");
  auto [dx, dbias] = bias_dropout_add_backward_kernel(grad, has_bias, pv, sd.key, sd.offset);
  if (dbias.has_value()) return {in_layout_of(grad, dx), *dbias};
  return {in_layout_of(grad, dx), at::empty({0}, grad.options().dtype(acc_of(grad.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& p, double eps, bool rms_norm, bool residual_in_fp32,
    const at::Tensor& seed) {
  const HostSeed sd = host_seed(seed, "dropout_add_layer_norm");
  const double pv = probability(p, "dropout_add_layer_norm");
  return dropout_add_layer_norm_kernel(x, residual, weight, bias, pv, eps, rms_norm, residual_in_fp32, sd.key,
                                       sd.offset);
}

// Absent gradients (no residual, weight or bias) are empty [0] tensors of the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_backward(
    const at::Tensor& dy, const std::optional<at::Tensor>& ds, const at::Tensor& s, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool has_bias, const at::Tensor& p,
    bool rms_norm, const at::Tensor& seed, at::ScalarType x_dtype, std::optional<at::ScalarType> res_dtype) {
  const char* op = "dropout_add_layer_norm_backward";
  const HostSeed sd = host_seed(seed, op);
  auto [dx, dres, dw, db] = dropout_add_layer_norm_backward_kernel(
      dy, ds, s, mean, rstd, weight, has_bias, probability(p, op), rms_norm, sd.key, sd.offset, x_dtype, res_dtype);
  const at::Tensor none = at::empty({0}, s.options().dtype(acc_of(x_dtype)));
  return {dx, dres.value_or(none), dw.value_or(none), db.value_or(none)};
}

}  // namespace
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("bias_dropout_add", &regops::cpu::bias_dropout_add);
  m.impl("bias_dropout_add_backward", &regops::cpu::bias_dropout_add_backward);
  m.impl("dropout_add_layer_norm", &regops::cpu::dropout_add_layer_norm);
  m.impl("dropout_add_layer_norm_backward", &regops::cpu::dropout_add_layer_norm_backward);
}
