// The derivatives of regops::cross_entropy and regops::label_cross_entropy in C++ (the formulas of
// regops/losses/ops.py, registered on the operators for the Autograd key): a call with gradients needs no Python between the public function and the kernels,
// forward or backward, on every device. Without the extension the Python formula runs; both are tested.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace regops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using CeSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, const std::optional<at::Tensor>&,
                                                             at::ArrayRef<double>, bool);
using CeBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                 const at::Tensor&, at::ArrayRef<double>);

const c10::TypedOperatorHandle<CeSig>& ce_op() {
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("regops::cross_entropy", "").typed<CeSig>();
  return handle;
}
const c10::TypedOperatorHandle<CeBackwardSig>& ce_backward_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("regops::cross_entropy_backward", "").typed<CeBackwardSig>();
  return handle;
}

// Gradients flow to the logits only; the backward op has no derivative of its own (as the Python formula).
struct CrossEntropyFn : torch::autograd::Function<CrossEntropyFn> {
  static constexpr size_t kInputs = 7;
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& index,
                               const at::Tensor& tweight, const at::Tensor& row_weight,
                               const std::optional<at::Tensor>& class_weight, at::ArrayRef<double> options,
                               bool want_stats) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // no zero tensors for the gradients of stats and argmax, never used
    auto [loss, stats, argmax] = ce_op().call(logits, index, tweight, row_weight, class_weight, options, want_stats);
    ctx->mark_non_differentiable({stats, argmax});
    ctx->save_for_backward({logits, index, tweight, row_weight, class_weight.value_or(at::Tensor()), stats, argmax});
    ctx->saved_data["options"] = std::vector<double>(options.begin(), options.end());
    return {loss, stats, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(kInputs);
    const auto saved = ctx->get_saved_variables();
    const std::vector<double> options = ctx->saved_data["options"].toDoubleVector();
    std::optional<at::Tensor> class_weight;
    if (saved[4].defined()) class_weight = saved[4];
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor grad = ce_backward_op().call(grads[0], saved[0], saved[1], saved[2], saved[3], class_weight, saved[5],
                                            saved[6], options);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy(const at::Tensor& logits, const at::Tensor& index,
                                                             const at::Tensor& tweight, const at::Tensor& row_weight,
                                                             const std::optional<at::Tensor>& class_weight,
                                                             at::ArrayRef<double> options, bool want_stats) {
  auto out = CrossEntropyFn::apply(logits, index, tweight, row_weight, class_weight, options, want_stats);
  return {out[0], out[1], out[2]};
}


using LabelSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const std::optional<at::Tensor>&, int64_t,
                                                                at::ArrayRef<double>, c10::string_view);
using LabelBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t,
                                    at::ArrayRef<double>, c10::string_view);

const c10::TypedOperatorHandle<LabelSig>& label_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("regops::label_cross_entropy", "").typed<LabelSig>();
  return handle;
}
const c10::TypedOperatorHandle<LabelBackwardSig>& label_backward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("regops::label_cross_entropy_backward", "")
                                 .typed<LabelBackwardSig>();
  return handle;
}

struct LabelCrossEntropyFn : torch::autograd::Function<LabelCrossEntropyFn> {
  static constexpr size_t kInputs = 6;
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
                               at::ArrayRef<double> options, c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);
    auto [loss, stats, argmax] = label_op().call(logits, target, class_weight, ignore_index, options, reduction);
    ctx->mark_non_differentiable({stats, argmax});
    ctx->save_for_backward({logits, target, class_weight.value_or(at::Tensor()), stats, argmax});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["options"] = std::vector<double>(options.begin(), options.end());
    ctx->saved_data["reduction"] = std::string(reduction);
    return {loss, stats, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(kInputs);
    const auto saved = ctx->get_saved_variables();
    const std::vector<double> options = ctx->saved_data["options"].toDoubleVector();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    std::optional<at::Tensor> class_weight;
    if (saved[2].defined()) class_weight = saved[2];
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor grad = label_backward_op().call(grads[0], saved[0], saved[1], class_weight, saved[3], saved[4],
                                               ctx->saved_data["ignore_index"].toInt(), options, reduction);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                                                   const std::optional<at::Tensor>& class_weight,
                                                                   int64_t ignore_index, at::ArrayRef<double> options,
                                                                   c10::string_view reduction) {
  auto out = LabelCrossEntropyFn::apply(logits, target, class_weight, ignore_index, options, reduction);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace regops

TORCH_LIBRARY_IMPL(regops, Autograd, m) {
  m.impl("cross_entropy", &regops::cross_entropy);
  m.impl("label_cross_entropy", &regops::label_cross_entropy);
}
