// Shared pieces of the optim family's C++ CPU kernels: the split of a list of tensors into pieces of about equal
// size for at::parallel_for (a fixed split: results, sums included, never depend on the thread count), and checks.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/cpu_common.h"

namespace regops {
namespace cpu {
namespace optim {

// Elements per piece, and per parallel task: small lists and small tensors stay on one thread.
constexpr int64_t kPiece = 1 << 15;

struct Piece {
  int64_t tensor, begin, end, span;
};

// The pieces of every span (a tensor, or a row of one) in order, at most kPiece elements each, and the task
// boundaries: consecutive pieces grouped into tasks of at least kPiece elements.
struct Plan {
  std::vector<Piece> pieces;
  std::vector<int64_t> tasks;  // pieces[tasks[k] .. tasks[k + 1]) form task k
};

inline Plan plan(const std::vector<Piece>& spans) {
  Plan out;
  out.tasks.push_back(0);
  int64_t in_task = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(spans.size()); ++s) {
    const Piece& span = spans[s];
    for (int64_t b = span.begin; b < span.end; b += kPiece) {
      const int64_t e = std::min(span.end, b + kPiece);
      out.pieces.push_back({span.tensor, b, e, s});
      in_task += e - b;
      if (in_task >= kPiece) {
        out.tasks.push_back(static_cast<int64_t>(out.pieces.size()));
        in_task = 0;
      }
    }
  }
  if (out.tasks.back() != static_cast<int64_t>(out.pieces.size())) {
    out.tasks.push_back(static_cast<int64_t>(out.pieces.size()));
  }
  return out;
}

// One span per whole tensor.
inline Plan plan_tensors(at::TensorList ts) {
  std::vector<Piece> spans;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i) spans.push_back({i, 0, ts[i].numel(), i});
  return plan(spans);
}

// Runs body(piece) for every piece, tasks in parallel.
template <typename Body>
void run(const Plan& p, const Body& body) {
  const int64_t n_tasks = static_cast<int64_t>(p.tasks.size()) - 1;
  auto work = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = p.tasks[t]; k < p.tasks[t + 1]; ++k) body(p.pieces[k]);
    }
  };
  if (n_tasks <= 1) {
    work(0, n_tasks);
  } else {
    at::parallel_for(0, n_tasks, 1, work);
  }
}

inline void check_list(at::TensorList ts, int64_t n, const char* op, const char* name, bool optional) {
  TORCH_CHECK(static_cast<int64_t>(ts.size()) == n || (optional && ts.empty()), "regops::", op, ": ", name,
              " must hold ", n, " tensors", optional ? " or none" : "", ", got ", ts.size());
}

// Tensor t must be a contiguous CPU tensor of like's dtype and size.
inline void check_like(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "regops::", op, ": ", name,
              " must be contiguous CPU tensors");
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.numel() == like.numel(), "regops::", op, ": ", name,
              " must match the parameters' dtype and size, got ", t.scalar_type(), " ", t.sizes(), " for ",
              like.scalar_type(), " ", like.sizes());
}

template <typename T>
inline T* mutable_ptr(at::TensorList ts, int64_t i) {
  return ts.empty() ? nullptr : const_cast<at::Tensor&>(ts[i]).mutable_data_ptr<T>();
}

template <typename T>
inline const T* const_ptr(at::TensorList ts, int64_t i) {
  return ts.empty() ? nullptr : ts[i].const_data_ptr<T>();
}

// torch.maximum: NaN wins.
template <typename C>
inline C nan_max(C a, C b) {
  return a != a ? a : (b != b ? b : (a > b ? a : b));
}

}  // namespace optim
}  // namespace cpu
}  // namespace regops
