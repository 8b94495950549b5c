// C++ CPU kernel of regops::optim_step (schema in regops/optim/ops.py): one pass over every tensor of the lists,
// bit-identical to regops.optim.reference.optim_step. Each tensor is processed in blocks of kBlock elements: the
// block is loaded into the compute dtype, every enabled stage runs as its own loop over the block (flags are
// checked once per block, and the loops vectorize), and the results are stored once.
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <utility>

#include "common/box_muller.h"
#include "optim/lists.h"

namespace regops {
namespace cpu {
namespace optim {
namespace {

enum class Method { kAdam, kSgd, kNesterov };
enum class Decay { kNone, kCoupled, kDecoupled, kCautious, kL2sp, kEwc };

// regops.optim.reference: H_* slots of the hyper vector, the noise counters per parameter.
struct Hyper {
  double lr, beta1, beta2, eps, wd, gf_alpha, gf_lamb, eta, gamma, clip;
};
constexpr uint64_t kNoiseParamCounters = uint64_t(1) << 40;
constexpr int64_t kBlock = 256;

Method parse_method(std::string_view s) {
  if (s == "adam") return Method::kAdam;
  if (s == "sgd") return Method::kSgd;
  TORCH_CHECK_VALUE(s == "nesterov", "regops::optim_step: method must be adam, sgd or nesterov, got ", s);
  return Method::kNesterov;
}

Decay parse_decay(std::string_view s) {
  if (s == "none") return Decay::kNone;
  if (s == "coupled") return Decay::kCoupled;
  if (s == "decoupled") return Decay::kDecoupled;
  if (s == "cautious") return Decay::kCautious;
  if (s == "l2sp") return Decay::kL2sp;
  TORCH_CHECK_VALUE(s == "ewc", "regops::optim_step: decay must be one of none, coupled, decoupled, cautious, l2sp, ",
                    "ewc; got ", s);
  return Decay::kEwc;
}

// regops.optim.reference.step_scalars: torch's formulas in double (the same libm pow as Python's).
struct Scalars {
  double step_size, bc2_sqrt, decay;
  float sigma;
  bool first;
};

Scalars step_scalars(const Hyper& h, double step, Method method) {
  Scalars s;
  const double t = step + 1.0;
  if (method == Method::kAdam) {
    s.step_size = h.lr / (1.0 - std::pow(h.beta1, t));
    s.bc2_sqrt = std::pow(1.0 - std::pow(h.beta2, t), 0.5);
  } else {
    s.step_size = h.lr;
    s.bc2_sqrt = 1.0;
  }
  s.sigma = h.eta > 0 ? static_cast<float>(std::sqrt(h.eta / std::pow(1.0 + step, h.gamma))) : 0.0f;
  s.first = step == 0.0;
  s.decay = 1.0 - h.lr * h.wd;
  return s;
}

double read_step(const at::Tensor& step) {
  TORCH_CHECK(step.device().is_cpu() && step.numel() == 1, "regops::optim_step: steps must be one-element CPU tensors");
  if (step.scalar_type() == at::kFloat) return *step.const_data_ptr<float>();
  TORCH_CHECK(step.scalar_type() == at::kDouble, "regops::optim_step: steps must be float32 or float64");
  return *step.const_data_ptr<double>();
}

void add_one(const at::Tensor& step) {
  at::Tensor s = step;
  if (s.scalar_type() == at::kFloat) {
    *s.mutable_data_ptr<float>() += 1.0f;
  } else {
    *s.mutable_data_ptr<double>() += 1.0;
  }
}

// Normals of the global elements [first, first + len) of parameter `param_id` (reference.gaussian_noise).
void noise_block(uint64_t key, uint64_t offset, int64_t param_id, int64_t first, int64_t len, float* z) {
  const uint64_t base = offset + static_cast<uint64_t>(param_id) * kNoiseParamCounters;
  for (int64_t c = first / 4; c * 4 < first + len; ++c) {
    const Words4 r = philox4x32_10(key, base + static_cast<uint64_t>(c));
    float v[4];
    normal::box_muller(r.w[0], r.w[1], &v[0], &v[1]);
    normal::box_muller(r.w[2], r.w[3], &v[2], &v[3]);
    for (int j = 0; j < 4; ++j) {
      const int64_t e = 4 * c + j - first;
      if (e >= 0 && e < len) z[e] = v[j];
    }
  }
}

struct Flags {
  Method method;
  Decay decay;
  bool maximize, clip, noise, has_scale;
  uint64_t key, offset;
  double grad_scale;
};

// The lists' entries of tensor i, typed.
template <typename T>
struct Tensors {
  T *p, *s1, *s2, *s3, *ema;
  const T *g, *anchor, *fisher, *restore;
  const double* row_scales_d;
  const float* row_scales_f;
  int64_t row_base, row_len, param_id, elem_offset;
};

// Loads g[k] *= factor of its row, for the elements [b, b + len) of a tensor of rows of row_len elements: one
// lookup per row, not a division per element.
template <typename C, typename S>
void scale_rows(C* __restrict__ g, const S* __restrict__ factors, int64_t row_base, int64_t row_len, int64_t b,
                int64_t len) {
  const int64_t rl = std::max<int64_t>(row_len, 1);
  for (int64_t k = 0; k < len;) {
    const int64_t r = (b + k) / rl, stop = std::min(len, (r + 1) * rl - b);
    const C f = static_cast<C>(factors[row_base + r]);
    for (; k < stop; ++k) g[k] = g[k] * f;
  }
}

// The stages of regops.optim.reference.optim_step on the elements [begin, end) of one tensor. The block arrays and
// the __restrict__ pointers into the block let the compiler vectorize each stage's loop.
template <typename T>
REGOPS_CPU_CLONES void step_piece(const Tensors<T>& a, const Scalars& sc, const Hyper& h, const Flags& f,
                                  int64_t begin, int64_t end) {
  using C = typename Acc<T>::type;
  alignas(64) C w0[kBlock], g[kBlock], w[kBlock], u[kBlock];
  alignas(64) float z[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    const T* wsrc = (a.restore ? a.restore : a.p) + b;  // may be the output itself: no __restrict__
    const T* __restrict__ gsrc = a.g + b;
    for (int64_t k = 0; k < len; ++k) w0[k] = static_cast<C>(wsrc[k]);
    for (int64_t k = 0; k < len; ++k) g[k] = static_cast<C>(gsrc[k]);
    if (f.has_scale) {
      const C gs = static_cast<C>(f.grad_scale);
      for (int64_t k = 0; k < len; ++k) g[k] = g[k] / gs;
    }
    if (f.maximize) {
      for (int64_t k = 0; k < len; ++k) g[k] = -g[k];
    }
    if (a.row_scales_d) scale_rows(g, a.row_scales_d, a.row_base, a.row_len, b, len);
    if (a.row_scales_f) scale_rows(g, a.row_scales_f, a.row_base, a.row_len, b, len);
    if (f.clip) {
      const C c = static_cast<C>(h.clip);
      for (int64_t k = 0; k < len; ++k) g[k] = g[k] < -c ? -c : (g[k] > c ? c : g[k]);  // NaN stays NaN
    }
    if (a.ema) {
      T* __restrict__ ema = a.ema + b;
      const C alpha = static_cast<C>(h.gf_alpha), rest = static_cast<C>(1.0 - h.gf_alpha);
      const C lamb = static_cast<C>(h.gf_lamb);
      for (int64_t k = 0; k < len; ++k) {
        const C prev = sc.first ? g[k] : static_cast<C>(ema[k]);
        const C e = prev * alpha + g[k] * rest;
        ema[k] = static_cast<T>(e);
        g[k] = g[k] + e * lamb;
      }
    }
    if (f.noise) {
      noise_block(f.key, f.offset, a.param_id, a.elem_offset + b, len, z);
      for (int64_t k = 0; k < len; ++k) g[k] = g[k] + static_cast<C>(z[k] * sc.sigma);
    }
    const C wd = static_cast<C>(h.wd);
    if (f.decay == Decay::kCoupled) {
      for (int64_t k = 0; k < len; ++k) g[k] = g[k] + w0[k] * wd;
    } else if (f.decay == Decay::kL2sp) {
      const T* __restrict__ anchor = a.anchor + b;
      for (int64_t k = 0; k < len; ++k) g[k] = g[k] + (w0[k] - static_cast<C>(anchor[k])) * wd;
    } else if (f.decay == Decay::kEwc) {
      const T* __restrict__ anchor = a.anchor + b;
      const T* __restrict__ fisher = a.fisher + b;
      for (int64_t k = 0; k < len; ++k) {
        g[k] = g[k] + (static_cast<C>(fisher[k]) * (w0[k] - static_cast<C>(anchor[k]))) * wd;
      }
    }
    if (f.method == Method::kAdam) {
      T* __restrict__ m_ptr = a.s1 + b;
      T* __restrict__ v_ptr = a.s2 + b;
      const double weight = 1.0 - h.beta1;
      const C wt = static_cast<C>(weight), one_minus_wt = static_cast<C>(1.0 - weight);
      const C b2 = static_cast<C>(h.beta2), rest2 = static_cast<C>(1.0 - h.beta2);
      if (std::fabs(weight) < 0.5) {  // torch.lerp's two formulas (reference.lerp)
        for (int64_t k = 0; k < len; ++k) {
          const C m0 = static_cast<C>(m_ptr[k]);
          u[k] = m0 + (g[k] - m0) * wt;
        }
      } else {
        for (int64_t k = 0; k < len; ++k) {
          const C m0 = static_cast<C>(m_ptr[k]);
          u[k] = g[k] - (g[k] - m0) * one_minus_wt;
        }
      }
      for (int64_t k = 0; k < len; ++k) m_ptr[k] = static_cast<T>(u[k]);
      for (int64_t k = 0; k < len; ++k) w[k] = static_cast<C>(v_ptr[k]) * b2 + (rest2 * g[k]) * g[k];
      for (int64_t k = 0; k < len; ++k) v_ptr[k] = static_cast<T>(w[k]);
      if (a.s3) {
        T* __restrict__ vmax = a.s3 + b;
        for (int64_t k = 0; k < len; ++k) w[k] = nan_max(static_cast<C>(vmax[k]), w[k]);
        for (int64_t k = 0; k < len; ++k) vmax[k] = static_cast<T>(w[k]);
      }
      const C bc2 = static_cast<C>(sc.bc2_sqrt), eps = static_cast<C>(h.eps);
      for (int64_t k = 0; k < len; ++k) g[k] = std::sqrt(w[k]) / bc2 + eps;  // g: the denominator from here
    } else {
      if (a.s1) {
        T* __restrict__ buf_ptr = a.s1 + b;
        const C mom = static_cast<C>(h.beta1), rest = static_cast<C>(1.0 - h.beta2);
        if (sc.first) {
          for (int64_t k = 0; k < len; ++k) w[k] = g[k];
        } else {
          for (int64_t k = 0; k < len; ++k) w[k] = static_cast<C>(buf_ptr[k]) * mom + g[k] * rest;
        }
        for (int64_t k = 0; k < len; ++k) buf_ptr[k] = static_cast<T>(w[k]);
        if (f.method == Method::kNesterov) {
          for (int64_t k = 0; k < len; ++k) g[k] = g[k] + w[k] * mom;
        } else {
          for (int64_t k = 0; k < len; ++k) g[k] = w[k];
        }
      }
      for (int64_t k = 0; k < len; ++k) u[k] = g[k];
    }
    const C factor = static_cast<C>(sc.decay);
    if (f.decay == Decay::kDecoupled) {
      for (int64_t k = 0; k < len; ++k) w0[k] = w0[k] * factor;
    } else if (f.decay == Decay::kCautious) {
      for (int64_t k = 0; k < len; ++k) {
        const bool same = u[k] == 0 || w0[k] == 0 || ((u[k] > 0) == (w0[k] > 0));
        w0[k] = same ? w0[k] * factor : w0[k];
      }
    }
    T* __restrict__ out = a.p + b;
    const C neg_step = static_cast<C>(-sc.step_size);
    if (f.method == Method::kAdam) {
      for (int64_t k = 0; k < len; ++k) out[k] = static_cast<T>(w0[k] + (u[k] * neg_step) / g[k]);
    } else {
      for (int64_t k = 0; k < len; ++k) out[k] = static_cast<T>(w0[k] + u[k] * neg_step);
    }
  }
}

void optim_step(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                at::TensorList state3, at::TensorList steps, at::TensorList ema, at::TensorList anchors,
                at::TensorList fishers, at::TensorList restore, const std::optional<at::Tensor>& row_scales,
                const at::Tensor& hyper, at::IntArrayRef param_ids, at::IntArrayRef elem_offsets,
                std::string_view method, std::string_view decay, bool maximize, bool clip,
                const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  const char* op = "optim_step";
  const int64_t n = static_cast<int64_t>(params.size());
  Flags f{parse_method(method), parse_decay(decay), maximize, clip, seed.has_value(), grad_scale.has_value(), 0, 0,
          1.0};
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) {
    check_list(restore, n, op, "restore", true);
    for (int64_t i = 0; i < static_cast<int64_t>(restore.size()); ++i) const_cast<at::Tensor&>(params[i]).copy_(restore[i]);
    return;
  }
  check_list(grads, n, op, "grads", false);
  check_list(steps, n, op, "steps", false);
  const std::pair<at::TensorList, const char*> optional_lists[] = {
      {state1, "state1"}, {state2, "state2"}, {state3, "state3"},  {ema, "ema"},
      {anchors, "anchors"}, {fishers, "fishers"}, {restore, "restore"}};
  for (const auto& [ts, name] : optional_lists) check_list(ts, n, op, name, true);
  TORCH_CHECK(static_cast<int64_t>(param_ids.size()) == n && static_cast<int64_t>(elem_offsets.size()) == n,
              "regops::optim_step: param_ids and elem_offsets need one entry per tensor");
  TORCH_CHECK(f.method != Method::kAdam || (!state1.empty() && !state2.empty()),
              "regops::optim_step: adam needs state1 (exp_avg) and state2 (exp_avg_sq)");
  TORCH_CHECK(f.decay != Decay::kL2sp || !anchors.empty(), "regops::optim_step: l2sp needs anchors");
  TORCH_CHECK(f.decay != Decay::kEwc || (!anchors.empty() && !fishers.empty()),
              "regops::optim_step: ewc needs anchors and fishers");
  TORCH_CHECK(hyper.scalar_type() == at::kDouble && hyper.numel() >= 10 && hyper.device().is_cpu(),
              "regops::optim_step: hyper must be a float64 CPU tensor of 10 values");
  const at::Tensor hv = hyper.contiguous();
  const double* hp = hv.const_data_ptr<double>();
  const Hyper h{hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7], hp[8], hp[9]};
  if (f.noise) {
    const HostSeed s = host_seed(*seed, op);
    f.key = static_cast<uint64_t>(s.key);
    f.offset = static_cast<uint64_t>(s.offset);
  }
  if (f.has_scale) f.grad_scale = grad_scale->item<double>();
  at::Tensor rs;
  if (row_scales.has_value()) {
    rs = row_scales->contiguous();
    TORCH_CHECK(rs.scalar_type() == at::kFloat || rs.scalar_type() == at::kDouble,
                "regops::optim_step: row_scales must be float32 or float64");
  }
  std::vector<int64_t> numels(n), row_bases(n);
  std::vector<Scalars> scalars(n);
  int64_t row_base = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "regops::optim_step: parameters must be contiguous CPU tensors");
    check_like(grads[i], p, op, "grads");
    for (at::TensorList ts : {state1, state2, state3, ema, anchors, fishers, restore}) {
      if (!ts.empty()) check_like(ts[i], p, op, "states, anchors and restore");
    }
    numels[i] = p.numel();
    row_bases[i] = row_base;
    row_base += p.dim() > 1 ? p.size(0) : 1;
    scalars[i] = step_scalars(h, read_step(steps[i]), f.method);
  }
  TORCH_CHECK(!rs.defined() || rs.numel() == row_base, "regops::optim_step: row_scales must hold ", row_base,
              " values (one per row), got ", rs.numel());
  run(plan_tensors(params), [&](const Piece& piece) {
    const int64_t i = piece.tensor;
    const at::Tensor& p = params[i];
    const int64_t rows = p.dim() > 1 ? p.size(0) : 1;
    REGOPS_CPU_FLOATING(p.scalar_type(), op, [&] {
      Tensors<T> a{mutable_ptr<T>(params, i), mutable_ptr<T>(state1, i), mutable_ptr<T>(state2, i),
                   mutable_ptr<T>(state3, i), mutable_ptr<T>(ema, i), const_ptr<T>(grads, i),
                   const_ptr<T>(anchors, i), const_ptr<T>(fishers, i), const_ptr<T>(restore, i),
                   rs.defined() && rs.scalar_type() == at::kDouble ? rs.const_data_ptr<double>() : nullptr,
                   rs.defined() && rs.scalar_type() == at::kFloat ? rs.const_data_ptr<float>() : nullptr,
                   row_bases[i], rows ? numels[i] / rows : 0, param_ids[i], elem_offsets[i]};
      step_piece<T>(a, scalars[i], h, f, piece.begin, piece.end);
    });
  });
  for (int64_t i = 0; i < n; ++i) add_one(steps[i]);
}

}  // namespace
}  // namespace optim
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CPU, m) { m.impl("optim_step", &regops::cpu::optim::optim_step); }
