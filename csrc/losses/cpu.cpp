// C++ CPU kernels of the regularized cross-entropy (regops::cross_entropy, regops::cross_entropy_backward; schemas
// in regops/losses/ops.py), the math of regops/losses/reference.py row by row: one thread owns a row, so results do
// not depend on the thread count. Sums over a row run in kLanes fixed partial sums combined in a fixed order (the
// compiler vectorizes them; every ISA clone gives the same bits). Accumulation in float32 (float64 for float64
// logits); exp in float32 is a Cody-Waite reduction and a degree-6 polynomial (about 1 ulp), with exp(-inf) = 0,
// exp(NaN) = NaN, so non-finite logits give what the reference gives.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/sum_cpu_dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_common.h"

namespace regops {
namespace cpu {
namespace {

// regops.losses.reference: the stats columns and the options' order (LossOptions).
enum Stat { kLse, kEntropy, kEl2n, kMaxProb, kMargin, kMeanZ, kDecCoef, kSigmaA, kSigmaB, kNStats };
constexpr int64_t kNOptions = 7;
constexpr int64_t kLanes = 16;
// Elements per parallel task: tiny calls stay on the calling thread.
constexpr int64_t kGrainElems = 1 << 15;

struct Options {
  double smoothing, maxsup, z_loss, confidence, decoupled, softcap, scale;
};

Options options_of(at::ArrayRef<double> o, const char* op) {
  TORCH_CHECK(static_cast<int64_t>(o.size()) == kNOptions, "regops::", op, ": options must hold ", kNOptions,
              " values (LossOptions), got ", o.size());
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

__attribute__((always_inline)) inline float exp_of(float x) {
  const float xc = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);  // NaN passes through
  const float magic = 12582912.0f;                                    // 1.5 * 2^23: round to nearest
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  uint32_t ti;
  std::memcpy(&ti, &t, sizeof ti);
  const uint32_t e = (ti - 0x4B400000u) + 127u;  // n + 127 (garbage for NaN, which the product keeps NaN)
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.0f;
  const uint32_t bits = e << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float out = y * scale;
  return x < -87.0f ? 0.0f : (x > 88.72283935546875f ? std::numeric_limits<float>::infinity() : out);
}
__attribute__((always_inline)) inline double exp_of(double x) { return std::exp(x); }

// sum_k f(k) for k < n in kLanes partial sums (lane l takes k = l mod kLanes), combined pairwise.
template <typename C, typename F>
__attribute__((always_inline)) inline C lane_sum(int64_t n, F f) {
  C acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += f(k + l);
  }
  for (int64_t l = 0; k + l < n; ++l) acc[l] += f(k + l);
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

// z = softcap * tanh(scale * x / softcap) (scale * x without a cap), in C.
template <typename T, typename C>
REGOPS_CPU_CLONES void load_row(const T* __restrict__ x, C* __restrict__ z, int64_t k, C scale, C softcap) {
  if (softcap != C(0)) {
    for (int64_t i = 0; i < k; ++i) {
      C v = static_cast<C>(x[i]);
      if (scale != C(1)) v = v * scale;
      z[i] = std::tanh(v / softcap) * softcap;
    }
  } else if (scale != C(1)) {
    for (int64_t i = 0; i < k; ++i) z[i] = static_cast<C>(x[i]) * scale;
  } else {
    for (int64_t i = 0; i < k; ++i) z[i] = static_cast<C>(x[i]);
  }
}

// The row's maximum, ignoring NaN (a NaN reaches the sum of exponentials and every result through it).
template <typename C>
REGOPS_CPU_CLONES C row_max(const C* __restrict__ z, int64_t k) {
  C m = -std::numeric_limits<C>::infinity();
  for (int64_t i = 0; i < k; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

// log_softmax in place: z_k <- (z_k - max) - log(sum_j exp(z_j - max)), as torch computes it.
template <typename C>
REGOPS_CPU_CLONES void log_softmax_row(C* __restrict__ z, C* __restrict__ e, int64_t k) {
  const C m = row_max(z, k);
  for (int64_t i = 0; i < k; ++i) e[i] = exp_of(z[i] - m);
  const C log_sum = std::log(lane_sum<C>(k, [&](int64_t i) { return e[i]; }));
  for (int64_t i = 0; i < k; ++i) z[i] = (z[i] - m) - log_sum;
}

// softmax into p: exp(z_k - max) / sum.
template <typename C>
REGOPS_CPU_CLONES void softmax_row(const C* __restrict__ z, C* __restrict__ p, int64_t k) {
  const C m = row_max(z, k);
  for (int64_t i = 0; i < k; ++i) p[i] = exp_of(z[i] - m);
  const C inv = C(1) / lane_sum<C>(k, [&](int64_t i) { return p[i]; });
  for (int64_t i = 0; i < k; ++i) p[i] = p[i] * inv;
}

template <typename C>
REGOPS_CPU_CLONES void exp_row(const C* __restrict__ x, C* __restrict__ y, int64_t k) {
  for (int64_t i = 0; i < k; ++i) y[i] = exp_of(x[i]);
}

// The first index of the maximum (torch.max's tie rule); NaN rows (every entry NaN) give (NaN, 0).
template <typename C>
std::pair<C, int64_t> first_max(const C* lp, int64_t k) {
  C best = lp[0];
  int64_t at = 0;
  if (std::isnan(best)) return {best, 0};
  for (int64_t i = 1; i < k; ++i) {
    if (lp[i] > best || std::isnan(lp[i])) {
      best = lp[i];
      at = i;
      if (std::isnan(best)) break;
    }
  }
  return {best, at};
}

// The arguments of both ops, checked: logits [N, K]; index int64 [N, J] in [0, K); tweight [N, J]; row_weight [N];
// class_weight [K] or none; the float ones converted to the accumulation dtype.
// The kernels read index, tweight and row_weight through ip / twp / rwp (the tensors' data, or buffers the caller
// owns: the label op's targets).
struct Args {
  at::Tensor logits, index, tweight, row_weight, class_weight;
  int64_t n, k, j;
  const int64_t* ip = nullptr;
  const void* twp = nullptr;
  const void* rwp = nullptr;
};

at::Tensor in_acc(const at::Tensor& t, at::ScalarType acc) {
  const at::Tensor a = t.scalar_type() == acc ? t : t.to(acc);
  return a.is_contiguous() ? a : a.contiguous();
}

Args check_args(const at::Tensor& logits, const at::Tensor& index, const at::Tensor& tweight,
                const at::Tensor& row_weight, const std::optional<at::Tensor>& class_weight, bool decoupled,
                const char* op) {
  TORCH_CHECK(logits.device().is_cpu() && index.device().is_cpu() && tweight.device().is_cpu() &&
                  row_weight.device().is_cpu() && (!class_weight.has_value() || class_weight->device().is_cpu()),
              "regops::", op, ": CPU tensors expected");
  TORCH_CHECK(logits.dim() == 2, "regops::", op, ": logits must be [N, V], got ", logits.sizes());
  const int64_t n = logits.size(0), k = logits.size(1);
  TORCH_CHECK(index.dim() == 2 && index.size(0) == n && index.scalar_type() == at::kLong, "regops::", op,
              ": index must be int64 [N, J] (N = ", n, "), got ", index.scalar_type(), " ", index.sizes());
  const int64_t j = index.size(1);
  TORCH_CHECK(tweight.sizes() == index.sizes() && at::isFloatingType(tweight.scalar_type()), "regops::", op,
              ": tweight must be a floating [N, J] tensor like index, got ", tweight.sizes());
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == n && at::isFloatingType(row_weight.scalar_type()),
              "regops::", op, ": row_weight must be a floating [N] tensor, got ", row_weight.sizes());
  TORCH_CHECK(!class_weight.has_value() ||
                  (class_weight->dim() == 1 && class_weight->size(0) == k &&
                   at::isFloatingType(class_weight->scalar_type())),
              "regops::", op, ": class_weight must be a floating [V] tensor (V = ", k, ")");
  TORCH_CHECK(!decoupled || j >= 2, "regops::", op, ": decoupled mixup needs index [N, 2] (a mixed pair)");
  TORCH_CHECK(n == 0 || j >= 1, "regops::", op, ": index needs at least one target per row");
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Args a{logits.is_contiguous() ? logits : logits.contiguous(),
         index.is_contiguous() ? index : index.contiguous(),
         in_acc(tweight, acc),
         in_acc(row_weight, acc),
         class_weight.has_value() ? in_acc(*class_weight, acc) : at::Tensor(),
         n,
         k,
         j};
  a.ip = a.index.const_data_ptr<int64_t>();
  a.twp = a.tweight.const_data_ptr();
  a.rwp = a.row_weight.const_data_ptr();
  if (k > 0) {
    const int64_t* ip = a.ip;
    for (int64_t i = 0; i < n * j; ++i) {
      TORCH_CHECK_INDEX(ip[i] >= 0 && ip[i] < k, "regops::", op, ": index holds ", ip[i], ", outside [0, ", k, ")");
    }
  }
  return a;
}

int64_t grain_rows(int64_t k) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, k)); }

// ------------------------------------------------------------------------------------------------ forward
template <typename T>
void forward_rows(const Args& a, const Options& o, bool want_stats, at::Tensor& loss, at::Tensor& stats,
                  at::Tensor& argmax) {
  using C = typename Acc<T>::type;
  const int64_t k = a.k, nj = a.j;
  const T* xp = a.logits.const_data_ptr<T>();
  const int64_t* ip = a.ip;
  const C* twp = static_cast<const C*>(a.twp);
  const C* rwp = static_cast<const C*>(a.rwp);
  const C* cwp = a.class_weight.defined() ? a.class_weight.const_data_ptr<C>() : nullptr;
  C* lossp = loss.mutable_data_ptr<C>();
  C* sp = stats.mutable_data_ptr<C>();
  int64_t* amp = argmax.mutable_data_ptr<int64_t>();
  const C smoothing = static_cast<C>(o.smoothing), maxsup = static_cast<C>(o.maxsup);
  const C z_loss = static_cast<C>(o.z_loss), confidence = static_cast<C>(o.confidence);
  const C decoupled = static_cast<C>(o.decoupled);
  const bool need_max = o.maxsup != 0.0 || want_stats;
  const bool need_p = o.confidence != 0.0 || want_stats || o.decoupled != 0.0;
  const bool need_mean = o.maxsup != 0.0 || (o.smoothing != 0.0 && cwp == nullptr);
  const C kc = static_cast<C>(k);
  at::parallel_for(0, a.n, grain_rows(k), [&](int64_t r0, int64_t r1) {
    std::vector<C> buf(2 * static_cast<size_t>(k));
    C* lp = buf.data();
    C* p = lp + k;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* idx = ip + r * nj;
      const C* tw = twp + r * nj;
      C* st = sp + r * kNStats;
      for (int64_t s = 0; s < kNStats; ++s) st[s] = C(0);
      amp[r] = 0;
      load_row<T, C>(xp + r * k, lp, k, static_cast<C>(o.scale), static_cast<C>(o.softcap));
      const C z0 = lp[0];
      log_softmax_row<C>(lp, p, k);
      const C lse = z0 - lp[0];
      C row = C(0), c_row = C(1);
      if (cwp != nullptr) {
        c_row = C(0);
        for (int64_t t = 0; t < nj; ++t) c_row += tw[t] * cwp[idx[t]];
      }
      {
        C ce = C(0);
        for (int64_t t = 0; t < nj; ++t) ce += (cwp != nullptr ? tw[t] * cwp[idx[t]] : tw[t]) * lp[idx[t]];
        row = -ce;
      }
      const C mean_lp = need_mean ? lane_sum<C>(k, [&](int64_t i) { return lp[i]; }) / kc : C(0);
      if (smoothing != C(0)) {
        const C u = cwp != nullptr ? -(lane_sum<C>(k, [&](int64_t i) { return lp[i] * cwp[i]; })) / kc : -mean_lp;
        row = row * (C(1) - smoothing) + u * smoothing;
      }
      C reg = C(0);
      std::pair<C, int64_t> top{C(0), 0};
      if (need_max) {
        top = first_max(lp, k);
        amp[r] = top.second;
        if (maxsup != C(0)) reg += maxsup * (top.first - mean_lp);
      }
      if (z_loss != C(0)) reg += z_loss * (lse * lse);
      if (need_p) {
        exp_row<C>(lp, p, k);
        const C ent = -lane_sum<C>(k, [&](int64_t i) { return p[i] * lp[i]; });
        st[kEntropy] = ent;
        st[kMeanZ] = lse - ent;
        if (confidence != C(0)) reg -= confidence * ent;
        if (decoupled != C(0)) {
          const int64_t ia = idx[0], ib = idx[1];
          const C lam = tw[0], lam_b = tw[1];
          const C rest = lane_sum<C>(k, [&](int64_t i) { return (i == ia || i == ib) ? C(0) : p[i]; });
          const C lpa = lp[ia], lpb = lp[ib];
          const C pa = exp_of(lpa), pb = exp_of(lpb);
          const C dec = lam * (std::log(pa + rest) - lpa) + lam_b * (std::log(pb + rest) - lpb);
          reg += decoupled * dec;
          st[kDecCoef] = lam / (pa + rest) + lam_b / (pb + rest);
          st[kSigmaA] = pa / (pa + rest);
          st[kSigmaB] = pb / (pb + rest);
        }
        if (want_stats) {
          const int64_t y = idx[0];
          const C rest = lane_sum<C>(k, [&](int64_t i) { return i == y ? C(0) : p[i]; });
          const C sq = lane_sum<C>(k, [&](int64_t i) { return i == y ? C(0) : p[i] * p[i]; });
          st[kEl2n] = std::sqrt(sq + rest * rest);
          st[kMaxProb] = exp_of(top.first);
          if (k > 1) {
            const C lp_y = lp[y];
            lp[y] = -std::numeric_limits<C>::infinity();
            st[kMargin] = lp_y - first_max(lp, k).first;
          } else {
            st[kMargin] = std::numeric_limits<C>::infinity();
          }
        }
      }
      row = row + c_row * reg;
      lossp[r] = row * rwp[r];
      st[kLse] = lse;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy(const at::Tensor& logits, const at::Tensor& index,
                                                             const at::Tensor& tweight, const at::Tensor& row_weight,
                                                             const std::optional<at::Tensor>& class_weight,
                                                             at::ArrayRef<double> options, bool want_stats) {
  const Options o = options_of(options, "cross_entropy");
  const Args a = check_args(logits, index, tweight, row_weight, class_weight, o.decoupled != 0.0, "cross_entropy");
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc);
  at::Tensor loss = at::empty({a.n}, opts);
  at::Tensor stats = at::empty({a.n, kNStats}, opts);
  at::Tensor argmax = at::empty({a.n}, logits.options().dtype(at::kLong));
  if (a.n == 0) return {loss, stats, argmax};
  TORCH_CHECK(a.k > 0, "regops::cross_entropy: logits need V >= 1 classes");
  REGOPS_CPU_FLOATING(logits.scalar_type(), "cross_entropy", [&] { forward_rows<T>(a, o, want_stats, loss, stats, argmax); });
  return {loss, stats, argmax};
}

// ------------------------------------------------------------------------------------------------ backward
// Row r's upstream gradient is gp[r * g_stride] (g_stride 0: one number for every row).
template <typename T>
void backward_rows(const Args& a, const Options& o, const typename Acc<T>::type* gp, int64_t g_stride,
                   const at::Tensor& stats, const at::Tensor& argmax, at::Tensor& out) {
  using C = typename Acc<T>::type;
  const int64_t k = a.k, nj = a.j;
  const T* xp = a.logits.const_data_ptr<T>();
  const int64_t* ip = a.ip;
  const C* twp = static_cast<const C*>(a.twp);
  const C* rwp = static_cast<const C*>(a.rwp);
  const C* cwp = a.class_weight.defined() ? a.class_weight.const_data_ptr<C>() : nullptr;
  const C* sp = stats.const_data_ptr<C>();
  const int64_t* amp = argmax.const_data_ptr<int64_t>();
  T* op = out.mutable_data_ptr<T>();
  const C smoothing = static_cast<C>(o.smoothing), maxsup = static_cast<C>(o.maxsup);
  const C z_loss = static_cast<C>(o.z_loss), confidence = static_cast<C>(o.confidence);
  const C decoupled = static_cast<C>(o.decoupled), softcap = static_cast<C>(o.softcap);
  const C scale = static_cast<C>(o.scale);
  const C kc = static_cast<C>(k);
  const C cw_sum = cwp != nullptr ? lane_sum<C>(k, [&](int64_t i) { return cwp[i]; }) : C(0);
  at::parallel_for(0, a.n, grain_rows(k), [&](int64_t r0, int64_t r1) {
    std::vector<C> buf(2 * static_cast<size_t>(k));
    C* z = buf.data();
    C* d = z + k;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* idx = ip + r * nj;
      const C* tw = twp + r * nj;
      const C* st = sp + r * kNStats;
      const C g = gp[r * g_stride] * rwp[r];
      C c_sp = C(0);
      for (int64_t t = 0; t < nj; ++t) c_sp += cwp != nullptr ? tw[t] * cwp[idx[t]] : tw[t];
      const C c_row = cwp != nullptr ? c_sp : C(1);
      const C lse = st[kLse];
      load_row<T, C>(xp + r * k, z, k, scale, softcap);
      softmax_row<C>(z, d, k);
      C a_coef = (C(1) - smoothing) * c_sp;
      if (smoothing != C(0)) a_coef = a_coef + smoothing * (cwp != nullptr ? cw_sum / kc : C(1));
      C reg_a = C(0);
      if (z_loss != C(0)) reg_a += C(2) * z_loss * lse;
      if (confidence != C(0)) reg_a -= confidence * st[kMeanZ];
      if (decoupled != C(0)) reg_a += decoupled * st[kDecCoef];
      a_coef = (a_coef + c_row * reg_a) * g;
      C cst = C(0);
      if (maxsup != C(0)) cst -= maxsup * c_row / kc;
      if (smoothing != C(0) && cwp == nullptr) cst -= smoothing / kc;
      cst = cst * g;
      if (confidence != C(0)) {
        const C b = confidence * c_row * g;
        for (int64_t i = 0; i < k; ++i) d[i] = d[i] * (a_coef + z[i] * b) + cst;
      } else {
        for (int64_t i = 0; i < k; ++i) d[i] = d[i] * a_coef + cst;
      }
      if (smoothing != C(0) && cwp != nullptr) {
        const C alpha = -smoothing / kc * g;
        for (int64_t i = 0; i < k; ++i) d[i] += alpha * cwp[i];
      }
      const C sparse = -(C(1) - smoothing) * g;
      for (int64_t t = 0; t < nj; ++t) d[idx[t]] += (cwp != nullptr ? tw[t] * cwp[idx[t]] : tw[t]) * sparse;
      if (maxsup != C(0)) d[amp[r]] += maxsup * c_row * g;
      if (decoupled != C(0)) {
        const int64_t ia = idx[0], ib = idx[1];
        const C coef = st[kDecCoef];
        const C pa = exp_of(z[ia] - lse), pb = exp_of(z[ib] - lse);
        const C s = decoupled * c_row * g;
        const C fix_a = tw[0] * (st[kSigmaA] - C(1)) - pa * coef;
        const C fix_b = tw[1] * (st[kSigmaB] - C(1)) - (ia != ib ? pb * coef : C(0));
        d[ia] += s * fix_a;
        d[ib] += s * fix_b;
      }
      T* y = op + r * k;
      if (softcap != C(0)) {
        for (int64_t i = 0; i < k; ++i) {
          const C q = z[i] / softcap;
          y[i] = static_cast<T>(d[i] * (C(1) - q * q) * scale);
        }
      } else if (scale != C(1)) {
        for (int64_t i = 0; i < k; ++i) y[i] = static_cast<T>(d[i] * scale);
      } else {
        for (int64_t i = 0; i < k; ++i) y[i] = static_cast<T>(d[i]);
      }
    }
  });
}

at::Tensor cross_entropy_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& index,
                                  const at::Tensor& tweight, const at::Tensor& row_weight,
                                  const std::optional<at::Tensor>& class_weight, const at::Tensor& stats,
                                  const at::Tensor& argmax, at::ArrayRef<double> options) {
  const char* op = "cross_entropy_backward";
  const Options o = options_of(options, op);
  const Args a = check_args(logits, index, tweight, row_weight, class_weight, o.decoupled != 0.0, op);
  at::Tensor out = at::empty({a.n, a.k}, logits.options());
  if (out.numel() == 0) return out;
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad.device().is_cpu() && stats.device().is_cpu() && argmax.device().is_cpu(), "regops::", op,
              ": CPU tensors expected");
  TORCH_CHECK(grad.numel() == a.n && at::isFloatingType(grad.scalar_type()), "regops::", op,
              ": grad must be a floating [N] tensor (N = ", a.n, ")");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == a.n && stats.size(1) == kNStats &&
                  at::isFloatingType(stats.scalar_type()),
              "regops::", op, ": stats must be [N, ", kNStats, "], got ", stats.sizes());
  TORCH_CHECK(argmax.numel() == a.n && argmax.scalar_type() == at::kLong, "regops::", op,
              ": argmax must be int64 [N]");
  const at::Tensor g = in_acc(grad, acc), s = in_acc(stats, acc);
  const at::Tensor am = argmax.is_contiguous() ? argmax : argmax.contiguous();
  if (o.maxsup != 0.0) {
    const int64_t* ap = am.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < a.n; ++r) {
      TORCH_CHECK_INDEX(ap[r] >= 0 && ap[r] < a.k, "regops::", op, ": argmax holds ", ap[r], ", outside [0, ",
                        a.k, ")");
    }
  }
  REGOPS_CPU_FLOATING(logits.scalar_type(), op, [&] {
    backward_rows<T>(a, o, g.const_data_ptr<typename Acc<T>::type>(), 1, s, am, out);
  });
  return out;
}


// ------------------------------------------------------------------------------------------------ integer labels
// regops::label_cross_entropy: the targets of plain labels built here rather than by a dozen small tensor ops per
// call (regops.losses._targets.label_targets gives the same tensors): index [N, 1] (an ignored row points at class
// 0), tweight [N, 1] and row_weight [N] both 1 for a kept row and 0 for an ignored one; the rows then go through
// the kernels above and the reduction is aten's sum, so losses and gradients have the bits of regops::cross_entropy
// on those targets followed by the same reduction.
enum class Reduction { kNone, kMean, kSum };

Reduction reduction_of(c10::string_view r, const char* op) {
  if (r == "none") return Reduction::kNone;
  if (r == "mean") return Reduction::kMean;
  TORCH_CHECK(r == "sum", "regops::", op, ": reduction must be 'mean', 'sum' or 'none', got '", std::string(r), "'");
  return Reduction::kSum;
}

struct LabelArgs {
  Args args;
  int64_t kept = 0;
  // The targets, held in plain buffers (no tensors: a tiny call's cost is mostly allocations): index [N] (an ignored
  // row points at class 0) and the weight [N] that serves as both tweight [N, 1] and row_weight, in the acc dtype.
  std::vector<int64_t> index;
  std::vector<float> weight_f;
  std::vector<double> weight_d;
};

std::vector<float>& weights_of(LabelArgs& l, float) { return l.weight_f; }
std::vector<double>& weights_of(LabelArgs& l, double) { return l.weight_d; }

LabelArgs label_args(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
                     int64_t ignore_index, const char* op) {
  TORCH_CHECK(logits.device().is_cpu() && target.device().is_cpu() &&
                  (!class_weight.has_value() || class_weight->device().is_cpu()),
              "regops::", op, ": CPU tensors expected");
  TORCH_CHECK(logits.dim() == 2, "regops::", op, ": logits must be [N, V], got ", logits.sizes());
  const int64_t n = logits.size(0), k = logits.size(1);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n && at::isIntegralType(target.scalar_type(), false), "regops::",
              op, ": target must hold integer labels [N] (N = ", n, "), got ", target.scalar_type(), " ",
              target.sizes());
  TORCH_CHECK(!class_weight.has_value() ||
                  (class_weight->dim() == 1 && class_weight->size(0) == k &&
                   at::isFloatingType(class_weight->scalar_type())),
              "regops::", op, ": class_weight must be a floating [V] tensor (V = ", k, ")");
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor labels = (target.scalar_type() == at::kLong ? target : target.to(at::kLong)).contiguous();
  LabelArgs l;
  l.index.resize(static_cast<size_t>(n));
  const int64_t* lp = labels.const_data_ptr<int64_t>();
  int64_t* ip = l.index.data();
  int64_t kept = 0;
  const void* wp = nullptr;
  AT_DISPATCH_FLOATING_TYPES(acc, "label_cross_entropy", [&] {
    std::vector<scalar_t>& w = weights_of(l, scalar_t());
    w.resize(static_cast<size_t>(n));
    scalar_t* tp = w.data();
    for (int64_t r = 0; r < n; ++r) {
      const int64_t y = lp[r];
      const bool keep = y != ignore_index;
      TORCH_CHECK_VALUE(!keep || (y >= 0 && y < k), "regops: target holds the class index ", y, ", outside [0, ", k,
                        ") and not ignore_index");
      ip[r] = keep ? y : 0;
      tp[r] = keep ? scalar_t(1) : scalar_t(0);
      kept += keep;
    }
    wp = tp;
  });
  l.args = Args{logits.is_contiguous() ? logits : logits.contiguous(),
                at::Tensor(),
                at::Tensor(),
                at::Tensor(),
                class_weight.has_value() ? in_acc(*class_weight, acc) : at::Tensor(),
                n,
                k,
                1};
  l.args.ip = ip;
  l.args.twp = wp;
  l.args.rwp = wp;
  l.kept = kept;
  return l;
}

// What "mean" divides by: the count of kept rows, or with class weights sum_r row_weight_r (tweight_r w_{y_r}) in
// aten's sum (as regops.losses._targets._weighted); 1 where that is 0 (every row ignored: a loss of 0).
template <typename C>
C mean_denominator(const LabelArgs& l) {
  const Args& a = l.args;
  if (!a.class_weight.defined()) return l.kept ? static_cast<C>(static_cast<double>(l.kept)) : C(1);
  at::Tensor w = at::empty({a.n}, a.class_weight.options());
  const int64_t* ip = a.ip;
  const C* tp = static_cast<const C*>(a.twp);
  const C* cp = a.class_weight.const_data_ptr<C>();
  C* wp = w.mutable_data_ptr<C>();
  for (int64_t r = 0; r < a.n; ++r) wp[r] = tp[r] * (tp[r] * cp[ip[r]]);
  const C d = at::sum(w).item<C>();
  return d == C(0) ? C(1) : d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                                                   const std::optional<at::Tensor>& class_weight,
                                                                   int64_t ignore_index, at::ArrayRef<double> options,
                                                                   c10::string_view reduction) {
  const char* op = "label_cross_entropy";
  const Options o = options_of(options, op);
  TORCH_CHECK(o.decoupled == 0.0, "regops::", op, ": decoupled mixup needs mixed targets");
  const Reduction red = reduction_of(reduction, op);
  const LabelArgs l = label_args(logits, target, class_weight, ignore_index, op);
  const Args& a = l.args;
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc);
  at::Tensor rows = at::empty({a.n}, opts);
  at::Tensor stats = at::empty({a.n, kNStats}, opts);
  at::Tensor argmax = at::empty({a.n}, logits.options().dtype(at::kLong));
  if (a.n > 0) {
    TORCH_CHECK(a.k > 0, "regops::", op, ": logits need V >= 1 classes");
    REGOPS_CPU_FLOATING(logits.scalar_type(), op, [&] { forward_rows<T>(a, o, false, rows, stats, argmax); });
  }
  if (red == Reduction::kNone) return {rows, stats, argmax};
  // aten's sum kernel called directly (the bits of rows.sum(), without two trips through the dispatcher)
  at::Tensor loss = at::cpu::sum(rows, at::IntArrayRef{});
  if (red == Reduction::kMean) {
    AT_DISPATCH_FLOATING_TYPES(acc, "label_cross_entropy", [&] { *loss.mutable_data_ptr<scalar_t>() /= mean_denominator<scalar_t>(l); });
  }
  return {loss, stats, argmax};
}

at::Tensor label_cross_entropy_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                        const std::optional<at::Tensor>& class_weight, const at::Tensor& stats,
                                        const at::Tensor& argmax, int64_t ignore_index, at::ArrayRef<double> options,
                                        c10::string_view reduction) {
  const char* op = "label_cross_entropy_backward";
  const Options o = options_of(options, op);
  TORCH_CHECK(o.decoupled == 0.0, "regops::", op, ": decoupled mixup needs mixed targets");
  const Reduction red = reduction_of(reduction, op);
  const LabelArgs l = label_args(logits, target, class_weight, ignore_index, op);
  const Args& a = l.args;
  at::Tensor out = at::empty({a.n, a.k}, logits.options());
  if (out.numel() == 0) return out;
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad.device().is_cpu() && stats.device().is_cpu() && argmax.device().is_cpu(), "regops::", op,
              ": CPU tensors expected");
  TORCH_CHECK(grad.numel() == (red == Reduction::kNone ? a.n : 1) && at::isFloatingType(grad.scalar_type()),
              "regops::", op, ": grad must be a floating ", red == Reduction::kNone ? "[N]" : "0-dim", " tensor");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == a.n && stats.size(1) == kNStats &&
                  at::isFloatingType(stats.scalar_type()),
              "regops::", op, ": stats must be [N, ", kNStats, "], got ", stats.sizes());
  TORCH_CHECK(argmax.numel() == a.n && argmax.scalar_type() == at::kLong, "regops::", op, ": argmax must be int64 [N]");
  const at::Tensor s = in_acc(stats, acc);
  const at::Tensor am = argmax.is_contiguous() ? argmax : argmax.contiguous();
  if (o.maxsup != 0.0) {
    const int64_t* ap = am.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < a.n; ++r) {
      TORCH_CHECK_INDEX(ap[r] >= 0 && ap[r] < a.k, "regops::", op, ": argmax holds ", ap[r], ", outside [0, ",
                        a.k, ")");
    }
  }
  // Every row's upstream gradient: grad itself ("none"), or the one number of "sum" (divided by the denominator for
  // "mean", in the accumulation dtype as autograd divides it).
  const at::Tensor g = in_acc(red == Reduction::kNone ? grad.reshape({a.n}) : grad, acc);
  REGOPS_CPU_FLOATING(logits.scalar_type(), op, [&] {
    using C = typename Acc<T>::type;
    if (red == Reduction::kNone) {
      backward_rows<T>(a, o, g.const_data_ptr<C>(), 1, s, am, out);
    } else {
      C v = *g.const_data_ptr<C>();
      if (red == Reduction::kMean) v = v / mean_denominator<C>(l);
      backward_rows<T>(a, o, &v, 0, s, am, out);
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("cross_entropy", &regops::cpu::cross_entropy);
  m.impl("cross_entropy_backward", &regops::cpu::cross_entropy_backward);
  m.impl("label_cross_entropy", &regops::cpu::label_cross_entropy);
  m.impl("label_cross_entropy_backward", &regops::cpu::label_cross_entropy_backward);
}
