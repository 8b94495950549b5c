// C++ CPU kernel of the mixing op (namespace regops_cpu, signature of regops.reference.mix.mix_apply): for x viewed
// as [B, M, H, W] ([B, D] as [B, 1, 1, D]), per-sample weights w_self, w_other (float32), partner (int64) and box
// (y0, y1, x0, x1) (int64, half-open),
//   out[b, m, h, w] = x[partner[b], m, h, w]                        inside box[b]
//                   = x[b] * w_self[b] + x[partner[b]] * w_other[b] outside, when w_other[b] != 0
//                   = x[b] * w_self[b]                              outside, when w_other[b] == 0 (partner not read)
// in float32 (float64 for float64), the two products and the sum each rounded (no FMA: -ffp-contract=off), then
// rounded once to x's dtype (uint8: half to even, clamped to [0, 255]) -- the reference's arithmetic, same bits.
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

template <typename T>
void mix_kernel(const T* xp, T* yp, int64_t batch, int64_t planes, int64_t height, int64_t width, const float* ws,
                const float* wo, const int64_t* partner, const int64_t* box) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t sample = planes * height * width;
  const int64_t grain = std::max<int64_t>(1, (kGrainBlocks * kBlockElems) / std::max<int64_t>(1, sample));
  at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* a = xp + b * sample;
      const T* o = xp + partner[b] * sample;
      T* y = yp + b * sample;
      const C s = static_cast<C>(ws[b]), w = static_cast<C>(wo[b]);
      const int64_t y0 = box[4 * b], y1 = box[4 * b + 1], c0 = box[4 * b + 2], c1 = box[4 * b + 3];
      const bool has_box = y1 > y0 && c1 > c0;
      for (int64_t r = 0; r < planes * height; ++r) {
        const int64_t at = r * width;
        if (w != C(0)) {
          mix_row<T, C>(a + at, o + at, y + at, width, s, w);
        } else {
          scale_row<T, C>(a + at, y + at, width, s);
        }
        const int64_t h = r % height;
        if (has_box && h >= y0 && h < y1) std::copy(o + at + c0, o + at + c1, y + at + c0);
      }
    }
  });
}

at::Tensor mix_apply(const at::Tensor& x, const at::Tensor& w_self, const at::Tensor& w_other,
                     const at::Tensor& partner, const at::Tensor& box) {
  const char* op = "mix_apply";
  TORCH_CHECK(x.device().is_cpu() && w_self.device().is_cpu() && w_other.device().is_cpu() &&
                  partner.device().is_cpu() && box.device().is_cpu(),
              "regops_cpu::", op, ": CPU tensors expected");
  TORCH_CHECK(x.dim() >= 2, "regops_cpu::", op, ": x must be [B, ..., H, W] or [B, D], got ", x.sizes());
  const int64_t batch = x.size(0);
  const int64_t height = x.dim() == 2 ? 1 : x.size(-2), width = x.size(-1);
  const int64_t planes = batch > 0 && height * width > 0 ? x.numel() / (batch * height * width) : 0;
  TORCH_CHECK(w_self.numel() == batch && w_other.numel() == batch && partner.numel() == batch &&
                  partner.scalar_type() == at::kLong && box.scalar_type() == at::kLong && box.numel() == 4 * batch,
              "regops_cpu::", op, ": w_self, w_other [B], partner int64 [B] and box int64 [B, 4] expected (B = ",
              batch, ")");
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor input = x.contiguous();
  const at::Tensor ws = w_self.to(at::kFloat).contiguous(), wo = w_other.to(at::kFloat).contiguous();
  const at::Tensor pt = partner.contiguous(), bx = box.contiguous();
  const int64_t* pp = pt.const_data_ptr<int64_t>();
  const int64_t* bp = bx.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(pp[b] >= 0 && pp[b] < batch, "regops_cpu::", op, ": partner[", b, "] = ", pp[b], " is not in [0, ",
                batch, ")");
    const int64_t* q = bp + 4 * b;
    TORCH_CHECK(!(q[1] > q[0] && q[3] > q[2]) || (q[0] >= 0 && q[1] <= height && q[2] >= 0 && q[3] <= width),
                "regops_cpu::", op, ": box[", b, "] = (", q[0], ", ", q[1], ", ", q[2], ", ", q[3],
                ") is outside the [", height, ", ", width, "] image");
  }
  // The output keeps x's memory format (empty_like); a channels-last x is mixed in logical order and copied in.
  at::Tensor y = out.is_contiguous() ? out : at::empty_like(input, at::MemoryFormat::Contiguous);
  const float* wsp = ws.const_data_ptr<float>();
  const float* wop = wo.const_data_ptr<float>();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    mix_kernel<T>(input.const_data_ptr<T>(), y.mutable_data_ptr<T>(), batch, planes, height, width, wsp, wop, pp, bp);
  };
  switch (input.scalar_type()) {
    case at::kFloat: run(float()); break;
    case at::kDouble: run(double()); break;
    case at::kHalf: run(c10::Half()); break;
    case at::kBFloat16: run(c10::BFloat16()); break;
    case at::kByte: run(uint8_t()); break;
    default:
      TORCH_CHECK(false, "regops_cpu::", op, ": unsupported dtype ", input.scalar_type(),
                  " (float32, float64, float16, bfloat16, uint8)");
  }
  if (!y.is_same(out)) out.copy_(y);
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace regops

TORCH_LIBRARY_IMPL(regops_cpu, CPU, m) { m.impl("mix_apply", &regops::cpu::mix_apply); }
