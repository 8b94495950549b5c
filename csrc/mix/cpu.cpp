// C++ CPU kernels of the mixing op (regops::mix_apply) and its transpose (regops::mix_apply_backward), the math of
// regops/mix/reference.py. For x viewed as [B, M, H, W] ([B, D] as [B, 1, 1, D]), per-sample weights w_self,
// w_other (read as float32), partner (int64, a permutation for the transpose) and box (y0, y1, x0, x1) (int64,
// half-open):
//   mix_apply:          out[b] = x[partner[b]]                          inside box[b]
//                              = x[b] * w_self[b] + x[partner[b]] * w_other[b]   outside (partner not read when
//                                                                                 w_other[b] == 0)
//   mix_apply_backward: out[b] = (outside box[b]) x[b] * w_self[b] + (x[o] inside box[o], x[o] * w_other[o]
//                                outside it when w_other[o] != 0),  o = the sample whose partner is b
// in float32 (float64 for float64), the products and the sum each rounded (no FMA: -ffp-contract=off), then
// rounded once to x's dtype (uint8: half to even, clamped to [0, 255]) -- the reference's arithmetic, same bits.
// The output is channels_last for a channels_last 4-D x, contiguous otherwise (regops.mix.reference.memory_format).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/cpu_common.h"

namespace regops {
namespace cpu {
namespace {

template <typename T, typename C>
inline T to_output(C y) {
  if constexpr (std::is_same_v<T, uint8_t>) {
    return static_cast<uint8_t>(std::min(C(255), std::max(C(0), std::nearbyint(y))));
  } else {
    return static_cast<T>(y);
  }
}

template <typename T, typename C>
REGOPS_CPU_CLONES void mix_row(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, int64_t len, C ws,
                               C wo) {
  for (int64_t i = 0; i < len; ++i) {
    const C pa = static_cast<C>(a[i]) * ws;
    const C pb = static_cast<C>(b[i]) * wo;
    y[i] = to_output<T, C>(pa + pb);
  }
}

template <typename T, typename C>
REGOPS_CPU_CLONES void scale_row(const T* __restrict__ a, T* __restrict__ y, int64_t len, C ws) {
  for (int64_t i = 0; i < len; ++i) y[i] = to_output<T, C>(static_cast<C>(a[i]) * ws);
}

// Columns [lo, hi) of one image row that a box covers (empty when the row is outside it).
struct Span {
  int64_t lo, hi;
};

inline Span span(const int64_t* box, int64_t h) {
  const bool hit = box[1] > box[0] && box[3] > box[2] && h >= box[0] && h < box[1];
  return hit ? Span{box[2], box[3]} : Span{0, 0};
}

// One row of the transposed mix: own = x[b] * ws outside own's span (0 inside), other = x[o] inside other's span,
// x[o] * wo outside it (0 when wo == 0), out = own + other.
template <typename T, typename C>
REGOPS_CPU_CLONES void transposed_row(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, int64_t len,
                                      C ws, C wo, Span own, Span other) {
  const bool weighted = wo != C(0);
  for (int64_t i = 0; i < len; ++i) {
    const C pa = (i >= own.lo && i < own.hi) ? C(0) : static_cast<C>(a[i]) * ws;
    const bool inside = i >= other.lo && i < other.hi;
    const C pb = inside ? static_cast<C>(b[i]) : (weighted ? static_cast<C>(b[i]) * wo : C(0));
    y[i] = to_output<T, C>(pa + pb);
  }
}

// y[b] = x[b] mixed with x[index[b]]; transpose: index is the inverse partner permutation (see the top).
template <typename T>
void mix_kernel(const T* xp, T* yp, int64_t batch, int64_t planes, int64_t height, int64_t width, const float* ws,
                const float* wo, const int64_t* index, const int64_t* box, bool transpose) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t sample = planes * height * width;
  const int64_t grain = std::max<int64_t>(1, (kGrainBlocks * kBlockElems) / std::max<int64_t>(1, sample));
  at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = index[b];
      const int64_t c = transpose ? o : b;
      const T* a = xp + b * sample;
      const T* other = xp + o * sample;
      T* y = yp + b * sample;
      const C s = static_cast<C>(ws[b]), w = static_cast<C>(wo[c]);
      for (int64_t r = 0; r < planes * height; ++r) {
        const int64_t at = r * width, h = r % height;
        if (transpose) {
          transposed_row<T, C>(a + at, other + at, y + at, width, s, w, span(box + 4 * b, h), span(box + 4 * c, h));
          continue;
        }
        if (w != C(0)) {
          mix_row<T, C>(a + at, other + at, y + at, width, s, w);
        } else {
          scale_row<T, C>(a + at, y + at, width, s);
        }
        const Span pasted = span(box + 4 * b, h);
        std::copy(other + at + pasted.lo, other + at + pasted.hi, y + at + pasted.lo);
      }
    }
  });
}

// The arguments both ops take: CPU tensors, x [B, ...], w_self and w_other [B], partner int64 [B] in [0, B), box
// int64 [B, 4] within the image. Returns the contiguous partner.
at::Tensor check_args(const at::Tensor& x, const at::Tensor& w_self, const at::Tensor& w_other,
                      const at::Tensor& partner, const at::Tensor& box, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w_self.device().is_cpu() && w_other.device().is_cpu() &&
                  partner.device().is_cpu() && box.device().is_cpu(),
              "regops::", op, ": CPU tensors expected");
  TORCH_CHECK(x.dim() >= 2, "regops::", op, ": x must be [B, ..., H, W] or [B, D], got ", x.sizes());
  const int64_t batch = x.size(0);
  const int64_t height = x.dim() == 2 ? 1 : x.size(-2), width = x.size(-1);
  TORCH_CHECK(w_self.numel() == batch && w_other.numel() == batch && partner.numel() == batch &&
                  partner.scalar_type() == at::kLong && box.scalar_type() == at::kLong && box.numel() == 4 * batch,
              "regops::", op, ": w_self, w_other [B], partner int64 [B] and box int64 [B, 4] expected (B = ", batch,
              ")");
  const at::Tensor p = partner.contiguous(), bx = box.contiguous();
  const int64_t* pp = p.const_data_ptr<int64_t>();
  const int64_t* bp = bx.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(pp[b] >= 0 && pp[b] < batch, "regops::", op, ": partner[", b, "] = ", pp[b], " is not in [0, ",
                batch, ")");
    const int64_t* q = bp + 4 * b;
    TORCH_CHECK(!(q[1] > q[0] && q[3] > q[2]) || (q[0] >= 0 && q[1] <= height && q[2] >= 0 && q[3] <= width),
                "regops::", op, ": box[", b, "] = (", q[0], ", ", q[1], ", ", q[2], ", ", q[3], ") is outside the [",
                height, ", ", width, "] image");
  }
  return p;
}

// Both ops on checked arguments; `index` is partner (forward) or its inverse (transpose).
at::Tensor mix(const at::Tensor& x, const at::Tensor& w_self, const at::Tensor& w_other, const at::Tensor& index,
               const at::Tensor& box, bool transpose, const char* op) {
  const int64_t batch = x.size(0);
  const int64_t height = x.dim() == 2 ? 1 : x.size(-2), width = x.size(-1);
  const int64_t planes = batch > 0 && height * width > 0 ? x.numel() / (batch * height * width) : 0;
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty_like(x, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  const at::Tensor input = x.contiguous();
  const at::Tensor ws = w_self.to(at::kFloat).contiguous(), wo = w_other.to(at::kFloat).contiguous();
  const at::Tensor bx = box.contiguous();
  // The kernel works in logical (NCHW) order; a channels-last output is copied in.
  at::Tensor y = out.is_contiguous() ? out : at::empty_like(input, at::MemoryFormat::Contiguous);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    mix_kernel<T>(input.const_data_ptr<T>(), y.mutable_data_ptr<T>(), batch, planes, height, width,
                  ws.const_data_ptr<float>(), wo.const_data_ptr<float>(), index.const_data_ptr<int64_t>(),
                  bx.const_data_ptr<int64_t>(), transpose);
  };
  switch (input.scalar_type()) {
    case at::kFloat: run(float()); break;
    case at::kDouble: run(double()); break;
    case at::kHalf: run(c10::Half()); break;
    case at::kBFloat16: run(c10::BFloat16()); break;
    case at::kByte: run(uint8_t()); break;
    default:
      TORCH_CHECK(false, "regops::", op, ": unsupported dtype ", input.scalar_type(),
                  " (float32, float64, float16, bfloat16, uint8)");
  }
  if (!y.is_same(out)) out.copy_(y);
  return out;
}

at::Tensor mix_apply(const at::Tensor& x, const at::Tensor& w_self, const at::Tensor& w_other,
                     const at::Tensor& partner, const at::Tensor& box) {
  const at::Tensor p = check_args(x, w_self, w_other, partner, box, "mix_apply");
  return mix(x, w_self, w_other, p, box, false, "mix_apply");
}

// The transposed mix reads, for each sample, the sample that took it as a partner: the inverse permutation.
at::Tensor mix_apply_backward(const at::Tensor& grad, const at::Tensor& w_self, const at::Tensor& w_other,
                              const at::Tensor& partner, const at::Tensor& box) {
  const char* op = "mix_apply_backward";
  const at::Tensor p = check_args(grad, w_self, w_other, partner, box, op);
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "regops::", op, ": unsupported dtype ", grad.scalar_type(),
              " (a gradient: float32, float64, float16, bfloat16)");
  const int64_t batch = p.numel();
  const int64_t* pp = p.const_data_ptr<int64_t>();
  at::Tensor inverse = at::full({batch}, -1, p.options());
  int64_t* inv = inverse.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(inv[pp[b]] < 0, "regops::", op, ": partner must be a permutation (", pp[b], " appears twice)");
    inv[pp[b]] = b;
  }
  return mix(grad, w_self, w_other, inverse, box, true, op);
}

}  // namespace
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("mix_apply", &regops::cpu::mix_apply);
  m.impl("mix_apply_backward", &regops::cpu::mix_apply_backward);
}
