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

// The three sums of a piece in kLanes independent double accumulators (lane j takes the elements j mod kLanes,
// then the lanes are added in order): a loop the compiler vectorizes without reassociating, the same sum every run.
constexpr int64_t kLanes = 16;

template <typename T>
void dot_piece(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w, int64_t begin, int64_t end,
               double* out) {
  using C = typename Acc<T>::type;
  alignas(64) double s0[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {};
  int64_t k = begin;
  for (; k + kLanes <= end; k += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const C x = static_cast<C>(a[k + j]);
      const C xw = w ? std::fabs(static_cast<C>(w[k + j])) * x : x;
      s0[j] += static_cast<double>(xw * xw);
    }
    if (b) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const C x = static_cast<C>(a[k + j]), y = static_cast<C>(b[k + j]);
        s1[j] += static_cast<double>(x * y);
        s2[j] += static_cast<double>(y * y);
      }
    }
  }
  for (int64_t j = 0; k + j < end; ++j) {
    const C x = static_cast<C>(a[k + j]);
    const C xw = w ? std::fabs(static_cast<C>(w[k + j])) * x : x;
    s0[j] += static_cast<double>(xw * xw);
    if (b) {
      const C y = static_cast<C>(b[k + j]);
      s1[j] += static_cast<double>(x * y);
      s2[j] += static_cast<double>(y * y);
    }
  }
  out[0] = out[1] = out[2] = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) {
    out[0] += s0[j];
    out[1] += s1[j];
    out[2] += s2[j];
  }
}

// A block of whole rows of one tensor (row_len > 0: each row's sums go straight to its slot), or a piece of one
// long row (row_len == 0: its sums go to a partial slot, added to the row's after the parallel part, in order).
struct RowBlock {
  int64_t tensor, begin, end, first_row, row_len;
};

at::Tensor optim_dots(at::TensorList a, at::TensorList b, at::TensorList w, bool rows) {
  const char* op = "optim_dots";
  const int64_t n = static_cast<int64_t>(a.size());
  TORCH_CHECK(n > 0, "regops::optim_dots: a must hold at least one tensor");
  check_list(b, n, op, "b", true);
  check_list(w, n, op, "w", true);
  bool f64 = false;
  std::vector<RowBlock> blocks;
  std::vector<int64_t> tasks{0};  // blocks[tasks[k] .. tasks[k + 1]) form task k (about kPiece elements)
  int64_t total_rows = 0, in_task = 0;
  auto add = [&](const RowBlock& blk) {
    blocks.push_back(blk);
    in_task += blk.end - blk.begin;
    if (in_task >= kPiece) {
      tasks.push_back(static_cast<int64_t>(blocks.size()));
      in_task = 0;
    }
  };
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& x = a[i];
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "regops::optim_dots: a must hold contiguous CPU tensors");
    if (!b.empty()) check_like(b[i], x, op, "b");
    if (!w.empty()) check_like(w[i], x, op, "w");
    f64 = f64 || x.scalar_type() == at::kDouble;
    const int64_t r = rows && x.dim() > 1 ? x.size(0) : 1;
    const int64_t len = r ? x.numel() / r : 0;
    if (len > kPiece) {
      for (int64_t k = 0; k < r; ++k) {
        for (int64_t s = k * len; s < (k + 1) * len; s += kPiece) {
          add({i, s, std::min(s + kPiece, (k + 1) * len), total_rows + k, 0});
        }
      }
    } else if (len > 0) {
      const int64_t per = std::max<int64_t>(1, kPiece / len);
      for (int64_t k = 0; k < r; k += per) add({i, k * len, std::min(r, k + per) * len, total_rows + k, len});
    }
    total_rows += r;
  }
  if (tasks.back() != static_cast<int64_t>(blocks.size())) tasks.push_back(static_cast<int64_t>(blocks.size()));
  std::vector<double> sums(3 * total_rows, 0.0), partial(3 * blocks.size(), 0.0);
  auto work = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = tasks[t]; k < tasks[t + 1]; ++k) {
        const RowBlock& blk = blocks[k];
        const int64_t i = blk.tensor;
        REGOPS_CPU_FLOATING(a[i].scalar_type(), op, [&] {
          const T *ap = a[i].const_data_ptr<T>(), *bp = const_ptr<T>(b, i), *wp = const_ptr<T>(w, i);
          if (blk.row_len == 0) {
            dot_piece<T>(ap, bp, wp, blk.begin, blk.end, partial.data() + 3 * k);
            return;
          }
          for (int64_t s = blk.begin, row = blk.first_row; s < blk.end; s += blk.row_len, ++row) {
            dot_piece<T>(ap, bp, wp, s, s + blk.row_len, sums.data() + 3 * row);
          }
        });
      }
    }
  };
  const int64_t n_tasks = static_cast<int64_t>(tasks.size()) - 1;
  if (n_tasks > 1) {
    at::parallel_for(0, n_tasks, 1, work);
  } else {
    work(0, n_tasks);
  }
  for (int64_t k = 0; k < static_cast<int64_t>(blocks.size()); ++k) {
    if (blocks[k].row_len != 0) continue;
    for (int j = 0; j < 3; ++j) sums[3 * blocks[k].first_row + j] += partial[3 * k + j];
  }
  at::Tensor out = at::empty({total_rows, 3}, a[0].options().dtype(f64 ? at::kDouble : at::kFloat));
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
