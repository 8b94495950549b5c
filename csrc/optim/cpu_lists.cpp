// C++ CPU kernels of regops::optim_dots, regops::optim_sam_perturb and regops::optim_axpby (schemas in
// regops/optim/ops.py), matching regops.optim.reference: the elementwise ops bit for bit, the sums to rounding
// (each piece is summed in double, then the pieces of a row or tensor in order: the same on every run).
#include <torch/library.h>

#include <optional>

#include "optim/lists.h"

namespace regops {
namespace cpu {
namespace optim {
namespace {

template <typename T>
void dot_piece(const T* a, const T* b, const T* w, int64_t begin, int64_t end, double* out) {
  using C = typename Acc<T>::type;
  double s0 = 0, s1 = 0, s2 = 0;
  for (int64_t k = begin; k < end; ++k) {
    const C x = static_cast<C>(a[k]);
    const C xw = w ? std::fabs(static_cast<C>(w[k])) * x : x;
    s0 += static_cast<double>(xw * xw);
    if (b) {
      const C y = static_cast<C>(b[k]);
      s1 += static_cast<double>(x * y);
      s2 += static_cast<double>(y * y);
    }
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
}

at::Tensor optim_dots(at::TensorList a, at::TensorList b, at::TensorList w, bool rows) {
  const char* op = "optim_dots";
  const int64_t n = static_cast<int64_t>(a.size());
  TORCH_CHECK(n > 0, "regops::optim_dots: a must hold at least one tensor");
  check_list(b, n, op, "b", true);
  check_list(w, n, op, "w", true);
  bool f64 = false;
  std::vector<Piece> spans;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& x = a[i];
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "regops::optim_dots: a must hold contiguous CPU tensors");
    if (!b.empty()) check_like(b[i], x, op, "b");
    if (!w.empty()) check_like(w[i], x, op, "w");
    f64 = f64 || x.scalar_type() == at::kDouble;
    const int64_t r = rows && x.dim() > 1 ? x.size(0) : 1;
    const int64_t len = r ? x.numel() / r : 0;
    for (int64_t k = 0; k < r; ++k) spans.push_back({i, k * len, (k + 1) * len, 0});
  }
  const Plan pl = plan(spans);
  std::vector<double> partial(3 * pl.pieces.size());
  const Piece* first = pl.pieces.data();  // a piece's slot is its index in the plan
  run(pl, [&](const Piece& piece) {
    const int64_t slot = &piece - first;
    const int64_t i = piece.tensor;
    REGOPS_CPU_FLOATING(a[i].scalar_type(), op, [&] {
      dot_piece<T>(a[i].const_data_ptr<T>(), const_ptr<T>(b, i), const_ptr<T>(w, i), piece.begin, piece.end,
                   partial.data() + 3 * slot);
    });
  });
  std::vector<double> sums(3 * spans.size(), 0.0);
  for (int64_t k = 0; k < static_cast<int64_t>(pl.pieces.size()); ++k) {
    for (int j = 0; j < 3; ++j) sums[3 * pl.pieces[k].span + j] += partial[3 * k + j];
  }
  at::Tensor out = at::empty({static_cast<int64_t>(spans.size()), 3}, a[0].options().dtype(f64 ? at::kDouble : at::kFloat));
  if (f64) {
    std::copy(sums.begin(), sums.end(), out.mutable_data_ptr<double>());
  } else {
    float* o = out.mutable_data_ptr<float>();
    for (size_t k = 0; k < sums.size(); ++k) o[k] = static_cast<float>(sums[k]);
  }
  return out;
}

bool skipped(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<double>() != 0.0;
}

void optim_sam_perturb(at::TensorList params, at::TensorList grads, at::TensorList old_params,
                       at::TensorList old_grads, const at::Tensor& scales, bool adaptive,
                       const std::optional<at::Tensor>& found_inf) {
  const char* op = "optim_sam_perturb";
  const int64_t n = static_cast<int64_t>(params.size());
  check_list(grads, n, op, "grads", false);
  check_list(old_params, n, op, "old_params", false);
  check_list(old_grads, n, op, "old_grads", true);
  TORCH_CHECK(scales.device().is_cpu() && scales.numel() == n, "regops::optim_sam_perturb: scales must hold ", n,
              " values on the CPU");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].device().is_cpu() && params[i].is_contiguous(),
                "regops::optim_sam_perturb: parameters must be contiguous CPU tensors");
    check_like(grads[i], params[i], op, "grads");
    check_like(old_params[i], params[i], op, "old_params");
    if (!old_grads.empty()) check_like(old_grads[i], params[i], op, "old_grads");
  }
  const at::Tensor sc = scales.to(at::kDouble).contiguous();
  const double* sp = sc.const_data_ptr<double>();
  const bool skip = skipped(found_inf);
  run(plan_tensors(params), [&](const Piece& piece) {
    const int64_t i = piece.tensor;
    REGOPS_CPU_FLOATING(params[i].scalar_type(), op, [&] {
      using C = typename Acc<T>::type;
      T* p = mutable_ptr<T>(params, i);
      const T* g = grads[i].const_data_ptr<T>();
      std::copy(p + piece.begin, p + piece.end, mutable_ptr<T>(old_params, i) + piece.begin);
      if (!old_grads.empty()) std::copy(g + piece.begin, g + piece.end, mutable_ptr<T>(old_grads, i) + piece.begin);
      if (skip) return;
      const C s = static_cast<C>(sp[i]);
      for (int64_t k = piece.begin; k < piece.end; ++k) {
        const C wv = static_cast<C>(p[k]);
        const C e = adaptive ? (wv * wv) * static_cast<C>(g[k]) * s : static_cast<C>(g[k]) * s;
        p[k] = static_cast<T>(wv + e);
      }
    });
  });
}

void optim_axpby(at::TensorList y, at::TensorList x, const at::Tensor& coeffs) {
  const char* op = "optim_axpby";
  const int64_t n = static_cast<int64_t>(y.size());
  check_list(x, n, op, "x", false);
  TORCH_CHECK(coeffs.numel() == 2, "regops::optim_axpby: coeffs must hold 2 values");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(y[i].device().is_cpu() && y[i].is_contiguous(), "regops::optim_axpby: y must hold contiguous CPU tensors");
    check_like(x[i], y[i], op, "x");
  }
  const at::Tensor c = coeffs.to(at::kDouble).cpu().contiguous();
  const double c0 = c.const_data_ptr<double>()[0], c1 = c.const_data_ptr<double>()[1];
  run(plan_tensors(y), [&](const Piece& piece) {
    const int64_t i = piece.tensor;
    REGOPS_CPU_FLOATING(y[i].scalar_type(), op, [&] {
      using C = typename Acc<T>::type;
      T* yp = mutable_ptr<T>(y, i);
      const T* xp = x[i].const_data_ptr<T>();
      const C a0 = static_cast<C>(c0), a1 = static_cast<C>(c1);
      // As in BLAS, a zero coefficient does not read its operand (inf or NaN there is overwritten).
      for (int64_t k = piece.begin; k < piece.end; ++k) {
        const C ya = a0 != 0 ? static_cast<C>(yp[k]) * a0 : C(0);
        const C xa = a1 != 0 ? static_cast<C>(xp[k]) * a1 : C(0);
        yp[k] = static_cast<T>(ya + xa);
      }
    });
  });
}

}  // namespace
}  // namespace optim
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("optim_dots", &regops::cpu::optim::optim_dots);
  m.impl("optim_sam_perturb", &regops::cpu::optim::optim_sam_perturb);
  m.impl("optim_axpby", &regops::cpu::optim::optim_axpby);
}
