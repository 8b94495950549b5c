// The derivatives of the dropout family's hot ops in C++ (the formulas of regops/dropout/ops.py, registered on the
// regops:: operators for the Autograd key): a call needs no Python between the public function and the kernels,
// forward or backward, on every device (the kernels themselves are whatever the dispatcher holds for the device).
// Without the extension the Python formulas run; both are tested against each other.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace regops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using DropoutSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using BdaSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&);
using BdaBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool, const at::Tensor&,
                                                          const at::Tensor&);
using DropPathSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, bool,
                               const at::Tensor&);
using DalnSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, double, bool, bool, const at::Tensor&);
using DalnBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, bool, const at::Tensor&, bool, const at::Tensor&, at::ScalarType,
    std::optional<at::ScalarType>);

const c10::TypedOperatorHandle<DropoutSig>& dropout_op() {
  static const auto handle = op<DropoutSig>("regops::dropout");
  return handle;
}
const c10::TypedOperatorHandle<BdaSig>& bda_op() {
  static const auto handle = op<BdaSig>("regops::bias_dropout_add");
  return handle;
}
const c10::TypedOperatorHandle<BdaBackwardSig>& bda_backward_op() {
  static const auto handle = op<BdaBackwardSig>("regops::bias_dropout_add_backward");
  return handle;
}
const c10::TypedOperatorHandle<DropPathSig>& drop_path_op() {
  static const auto handle = op<DropPathSig>("regops::drop_path");
  return handle;
}
const c10::TypedOperatorHandle<DalnSig>& daln_op() {
  static const auto handle = op<DalnSig>("regops::dropout_add_layer_norm");
  return handle;
}
const c10::TypedOperatorHandle<DalnBackwardSig>& daln_backward_op() {
  static const auto handle = op<DalnBackwardSig>("regops::dropout_add_layer_norm_backward");
  return handle;
}

at::ScalarType acc(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ------------------------------------------------------------------------------------------------ dropout
// The Jacobian is the diagonal mask: the backward is the op on the gradient (differentiable in turn).
struct DropoutFn : torch::autograd::Function<DropoutFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& p, const at::Tensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({p, seed});
    return dropout_op().call(x, p, seed);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();  // no graph to build: straight to the kernel
    return {dropout_op().call(grads[0], saved[0], saved[1]), at::Tensor(), at::Tensor()};
  }
};

at::Tensor dropout(const at::Tensor& x, const at::Tensor& p, const at::Tensor& seed) {
  return DropoutFn::apply(x, p, seed);
}

// ------------------------------------------------------------------------------------------------ bias_dropout_add
// dx = mask * g (row layout), dbias = column sums of dx in the accumulation dtype, dresidual = g. Under
// create_graph the mask product is the op itself (every order of derivative); otherwise the fused backward.
struct BiasDropoutAddFn : torch::autograd::Function<BiasDropoutAddFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                            const at::Tensor& residual, const at::Tensor& p, const at::Tensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({p, seed});
    ctx->saved_data["bias_dtype"] = bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    return bda_op().call(x, bias, residual, p, seed);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& g = grads[0];
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool has_bias = bias_dtype >= 0;
    at::Tensor dx, dbias;
    if (at::GradMode::is_enabled()) {
      dx = bda_op().call(g, std::nullopt, at::zeros_like(g), saved[0], saved[1]);
      if (has_bias) {
        const int64_t cols = dx.dim() ? dx.size(-1) : 1;
        dbias = dx.reshape({-1, cols}).to(acc(dx.scalar_type())).sum(0).to(static_cast<at::ScalarType>(bias_dtype));
      }
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, dbias) = bda_backward_op().call(g, has_bias, saved[0], saved[1]);
      dbias = has_bias ? dbias.to(static_cast<at::ScalarType>(bias_dtype)) : at::Tensor();
    }
    return {dx, dbias, g, at::Tensor(), at::Tensor()};
  }
};

at::Tensor bias_dropout_add(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                            const at::Tensor& p, const at::Tensor& seed) {
  return BiasDropoutAddFn::apply(x, bias, residual, p, seed);
}

// ------------------------------------------------------------------------------------------------ drop path
struct DropPathFn : torch::autograd::Function<DropPathFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                            const at::Tensor& p, bool scale_by_keep, const at::Tensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({p, seed});
    ctx->saved_data["scale_by_keep"] = scale_by_keep;
    ctx->saved_data["has_residual"] = residual.has_value();
    return drop_path_op().call(x, residual, p, scale_by_keep, seed);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    const at::Tensor dx =
        drop_path_op().call(grads[0], std::nullopt, saved[0], ctx->saved_data["scale_by_keep"].toBool(), saved[1]);
    const at::Tensor dres = ctx->saved_data["has_residual"].toBool() ? grads[0] : at::Tensor();
    return {dx, dres, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor drop_path(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& p,
                     bool scale_by_keep, const at::Tensor& seed) {
  return DropPathFn::apply(x, residual, p, scale_by_keep, seed);
}

// ------------------------------------------------------------------------------------------------ + LayerNorm
struct DropoutAddLayerNormFn : torch::autograd::Function<DropoutAddLayerNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& p, double eps, bool rms_norm, bool residual_in_fp32,
                               const at::Tensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, s, mean, rstd] = daln_op().call(x, residual, weight, bias, p, eps, rms_norm, residual_in_fp32, seed);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->save_for_backward({s, mean, rstd, weight.value_or(at::Tensor()), p, seed});
    auto dtype = [](const std::optional<at::Tensor>& t) {
      return t.has_value() ? static_cast<int64_t>(t->scalar_type()) : int64_t{-1};
    };
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["rms_norm"] = rms_norm;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["res_dtype"] = dtype(residual);
    ctx->saved_data["weight_dtype"] = dtype(weight);
    ctx->saved_data["bias_dtype"] = dtype(bias);
    return {y, s, mean, rstd};
  }

  // The backward from differentiable ATen ops (create_graph): the row statistics are recomputed from s and the
  // mask product is bias_dropout_add of the gradient, as regops.dropout.ops._daln_backward_differentiable.
  static variable_list differentiable_backward(AutogradContext* ctx, const at::Tensor& dy, const at::Tensor& ds,
                                               const at::Tensor& s, const at::Tensor& weight, const at::Tensor& p,
                                               const at::Tensor& seed) {
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const bool rms_norm = ctx->saved_data["rms_norm"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto cd = acc(x_dtype);
    const int64_t cols = s.size(-1);
    const at::Tensor sr = s.reshape({-1, cols}).to(cd), g = dy.reshape({-1, cols}).to(cd);
    const at::Tensor mean = rms_norm ? at::zeros_like(sr.narrow(1, 0, 1)) : sr.mean(1, true);
    const at::Tensor rstd = at::rsqrt((sr - mean).pow(2).mean(1, true) + eps);
    const at::Tensor xhat = (sr - mean) * rstd;
    const at::Tensor wg = weight.defined() ? g * weight.to(cd) : g;
    at::Tensor dsum = wg - xhat * (xhat * wg).mean(1, true);
    if (!rms_norm) dsum = dsum - wg.mean(1, true);
    dsum = dsum * rstd;
    if (ds.defined()) dsum = dsum + ds.reshape({-1, cols}).to(cd);
    const at::Tensor dx = bda_op().call(dsum, std::nullopt, at::zeros_like(dsum), p, seed).reshape(s.sizes());
    auto as = [&](const char* key, const at::Tensor& t) {
      const int64_t d = ctx->saved_data[key].toInt();
      return d >= 0 ? t.to(static_cast<at::ScalarType>(d)) : at::Tensor();
    };
    return {dx.to(x_dtype), as("res_dtype", dsum.reshape(s.sizes())), as("weight_dtype", (g * xhat).sum(0)),
            as("bias_dtype", g.sum(0))};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &s = saved[0], &mean = saved[1], &rstd = saved[2], &weight = saved[3], &p = saved[4],
                     &seed = saved[5];
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const at::Tensor dy = grads[0].defined() ? grads[0] : at::zeros(s.sizes(), s.options().dtype(x_dtype));
    const at::Tensor& ds = grads[1];
    variable_list out;
    if (at::GradMode::is_enabled()) {
      out = differentiable_backward(ctx, dy, ds, s, weight, p, seed);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      const int64_t res_dtype = ctx->saved_data["res_dtype"].toInt();
      std::optional<at::ScalarType> res;
      if (res_dtype >= 0) res = static_cast<at::ScalarType>(res_dtype);
      const bool has_bias = ctx->saved_data["bias_dtype"].toInt() >= 0;
      std::optional<at::Tensor> w;
      if (weight.defined()) w = weight;
      std::optional<at::Tensor> ds_opt;
      if (ds.defined()) ds_opt = ds;
      auto [dx, dres, dw, db] = daln_backward_op().call(dy, ds_opt, s, mean, rstd, w, has_bias, p,
                                                        ctx->saved_data["rms_norm"].toBool(), seed, x_dtype, res);
      auto as = [&](const char* key, const at::Tensor& t) {
        const int64_t d = ctx->saved_data[key].toInt();
        return d >= 0 ? t.to(static_cast<at::ScalarType>(d)) : at::Tensor();
      };
      out = {dx, res_dtype >= 0 ? dres : at::Tensor(), as("weight_dtype", dw), as("bias_dtype", db)};
    }
    out.resize(9);  // p, eps, rms_norm, residual_in_fp32, seed: no gradient
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& p, double eps, bool rms_norm, bool residual_in_fp32,
    const at::Tensor& seed) {
  auto out = DropoutAddLayerNormFn::apply(x, residual, weight, bias, p, eps, rms_norm, residual_in_fp32, seed);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, Autograd, m) {
  m.impl("dropout", &regops::dropout);
  m.impl("bias_dropout_add", &regops::bias_dropout_add);
  m.impl("drop_path", &regops::drop_path);
  m.impl("dropout_add_layer_norm", &regops::dropout_add_layer_norm);
}
