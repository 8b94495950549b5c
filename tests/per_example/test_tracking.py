"""The examples followed through the ops real models use, each against the per-example loop in float64: rows
flattened and windowed, a relative-position bias whose leading dim has the batch size, parameters used through
slices, reshapes, casts and products no rule names, packed sequences given to the model, and the whole-model
torch.func path (its warning, its chunks, what it refuses)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regops
from regops.per_example import _vmap
from regops.per_example._layout import Layout, batch_first, reshaped
from tests.per_example.models import loop_norms


def _check(model: nn.Module, x, loss, fast: bool = True, rtol: float = 1e-10):
    """Norms and clipped sums (bound: 0.7 x the median norm) against the per-example loop; ``fast``: no use left to
    the torch.func path (no warning), else exactly one warning that names it."""
    expected = loop_norms(model, x, loss)
    total = torch.stack([v.square() for v in expected.values()]).sum(0).sqrt()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.zero_grad(set_to_none=True)
        with regops.per_sample_grad_norms(model, "sum") as norms:
            loss(model(x)).backward()
        got = norms.per_param
        bound = 0.7 * total.median().item()
        model.zero_grad(set_to_none=True)
        with regops.dp_clipping(model, max_norm=bound, loss_reduction="sum"):
            loss(model(x)).backward()
    slow = [str(w.message) for w in caught if str(w.message).startswith("regops: per-example gradients of")]
    assert (slow == []) == fast, slow
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=rtol, atol=1e-12, msg=k)
    clipped = _loop_clipped(model, x, loss, bound)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, clipped[k], rtol=rtol, atol=1e-12, msg=k)
    return slow


def _loop_clipped(model, x, loss, bound):
    params = dict(model.named_parameters())
    out = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(loss(model(x[i : i + 1])), list(params.values()), allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), gs, strict=True)]
        norm = torch.stack([g.square().sum() for g in gs]).sum().sqrt()
        f = min(1.0, bound / (norm.item() + 1e-6))
        for k, g in zip(params, gs, strict=True):
            out[k] += f * g
    return out


def _sq(out):
    return out.square().sum()


# ----------------------------------------------------------------------------------------------- layouts
def test_layout_follows_flattens_windows_and_sequence_first_rows():
    b = 3
    x = Layout(0, b)
    flat = reshaped(x, (b, 4, 5), (b * 4, 5))
    assert (flat.dim, flat.inner, flat.outer) == (0, 4, 1)
    assert reshaped(flat, (b * 4, 5), (b, 4, 5)).plain
    seq = reshaped(Layout(1, b), (4, b, 5), (4 * b, 5))
    assert (seq.dim, seq.inner, seq.outer) == (0, 1, 4)
    # a window partition: [B, H, W, C] -> [B, H/2, 2, W/2, 2, C] -> permute -> [B * 4, 2, 2, C]
    win = reshaped(Layout(0, b), (b, 2, 2, 2, 2, 5), (b * 4, 2, 2, 5))
    assert (win.dim, win.inner) == (0, 4)
    assert reshaped(Layout(0, b), (b, 6), (2, 3 * 3)) is None  # the batch split across dims: lost, not guessed
    t = torch.arange(b * 4 * 5).reshape(b, 4, 5).double()
    torch.testing.assert_close(batch_first(t.reshape(b * 4, 5), flat).reshape(b, 4, 5), t)
    rows = Layout(0, 2, index=torch.tensor([1, 0, 1]))  # explicit rows: example 0 has one, example 1 two
    got = batch_first(torch.tensor([[1.0], [2.0], [3.0]]), rows)
    torch.testing.assert_close(got, torch.tensor([[[2.0], [0.0]], [[1.0], [3.0]]]))


class Windows(nn.Module):
    """Swin's partition of [B, H, W, C] into [B * nW, ws * ws, C] windows, attention with a relative-position bias
    table indexed by a buffer, windows merged back, then a head; and a [B * T, d] flatten around an MLP (OPT)."""

    def __init__(self, c: int = 4, ws: int = 2) -> None:
        super().__init__()
        self.ws = ws
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, 1))
        idx = torch.arange(ws)
        rel = (idx[:, None, None, None] - idx[None, None, :, None]) * (2 * ws - 1) + (
            idx[None, :, None, None] - idx[None, None, None, :]
        )
        self.register_buffer("index", (rel + (2 * ws - 1) * (ws - 1) + ws - 1).reshape(ws * ws, ws * ws))
        self.fc, self.ln, self.head = nn.Linear(c, c), nn.LayerNorm(c), nn.Linear(c, 3)

    def forward(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        ws = self.ws
        win = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        q, k, v = self.qkv(win).chunk(3, -1)
        att = q @ k.transpose(-1, -2) + self.table[self.index.view(-1)].view(ws * ws, ws * ws)
        win = self.proj(att.softmax(-1) @ v)
        x = win.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, c)
        x = x + self.fc(torch.tanh(self.ln(x.reshape(-1, c)))).view(b, h * w, c)  # [B * T, d] rows
        return self.head(x.mean(1))


def test_windows_and_flattened_rows_are_exact_on_the_fast_path():
    torch.manual_seed(0)
    _check(Windows().double(), torch.randn(3, 4, 4, 4, dtype=torch.float64), _sq)


class RelativeBias(nn.Module):
    """T5's relative-position bias: an Embedding of ``[T, T]`` bucket ids (no batch dim), permuted to
    ``[1, H, T, T]`` and added to the attention scores; here ``T == B``, so a size-based reading takes the
    buckets' leading dim for the batch."""

    def __init__(self, d: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.bias = nn.Embedding(5, heads)
        self.qk = nn.Linear(d, 2 * d * heads)
        self.out = nn.Linear(heads, 3)

    def forward(self, x):  # [B, T, d]
        t = x.shape[1]
        pos = torch.arange(t)
        buckets = (pos[None, :] - pos[:, None]).clamp(-2, 2) + 2
        q, k = self.qk(x).view(x.shape[0], t, self.heads, -1).transpose(1, 2).chunk(2, -1)
        scores = q @ k.transpose(-1, -2) + self.bias(buckets).permute(2, 0, 1).unsqueeze(0)
        return self.out(scores.softmax(-1).mean((2, 3)))


def test_relative_bias_whose_leading_dim_has_the_batch_size_is_exact():
    torch.manual_seed(0)
    _check(RelativeBias().double(), torch.randn(4, 4, 4, dtype=torch.float64), _sq)


class ParameterUses(nn.Module):
    """Parameters used by ops no rule names: a layer scale through a reshape (ConvNeXt), a position embedding sliced
    to the sequence (``pos_embed[:, :T]``), one packed q/k/v weight split into blocks, a class token expanded and
    concatenated, a cast weight, and an ``einsum``."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(d))
        self.pos = nn.Parameter(torch.randn(1, 8, d))
        self.qkv = nn.Parameter(torch.randn(3 * d, d))
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.w = nn.Parameter(torch.randn(d, 2))

    def forward(self, x):  # [B, T, d]
        h = x + self.pos[:, : x.shape[1]]
        h = h * self.gamma.reshape(1, 1, -1)
        wq, wk, wv = self.qkv.split(h.shape[-1])
        h = torch.tanh(F.linear(h, wq)) + F.linear(h, wk.to(h.dtype).contiguous()) * torch.sigmoid(h @ wv.t())
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1)
        return torch.einsum("btd,dk->bk", h, self.w)


def test_parameters_used_through_slices_reshapes_casts_and_einsum_are_exact():
    torch.manual_seed(0)
    _check(ParameterUses().double(), torch.randn(3, 5, 4, dtype=torch.float64), _sq)


class PackedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
        self.head = nn.Linear(8, 2)

    def forward(self, packed):
        out, (h, _) = self.lstm(packed)
        return self.head(torch.cat([h[-2], h[-1]], -1))


def test_a_packed_sequence_given_to_the_model_is_exact():
    """The model's input is a PackedSequence: its rows' examples come from its batch sizes and sorted indices."""
    torch.manual_seed(0)
    model = PackedInput().double()
    lengths = torch.tensor([2, 5, 3, 4])
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    pack = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    params = dict(model.named_parameters())
    expected = {k: [] for k in params}
    for i in range(4):
        one = nn.utils.rnn.pack_padded_sequence(x[i : i + 1], lengths[i : i + 1], batch_first=True)
        gs = torch.autograd.grad(model(one).square().sum(), list(params.values()))
        for k, g in zip(params, gs, strict=True):
            expected[k].append(g.norm())
    with regops.per_sample_grad_norms(model, "sum") as norms:
        model(pack).square().sum().backward()
    for k, v in expected.items():
        torch.testing.assert_close(norms.per_param[k], torch.stack(v), rtol=1e-10, atol=1e-12, msg=k)


# ----------------------------------------------------------------------------------------------- torch.func path
class Unknown(nn.Module):
    """An op the tracker does not know (its effect on the examples' place) between two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.s = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = torch.special.erfcx(0.1 * self.a(x))
        return self.b(h * self.s)


def test_unattributable_uses_take_the_whole_model_torch_func_path(monkeypatch):
    """Exact (norms and clipping), with one warning naming the modules and the op; in chunks of examples that keep
    the per-example gradients held at once within the budget."""
    torch.manual_seed(0)
    model = Unknown().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    n_params = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(_vmap, "CHUNK_BYTES", 4 * n_params * 2)  # two examples per chunk
    assert _vmap.chunk_size(dict(model.named_parameters()), 6) == 2
    slow = _check(model, x, _sq, fast=False)
    assert len(slow) == 2  # one per block: the norms, then dp_clipping
    assert all("uses of <root>, b:" in w and "special_erfcx" in w for w in slow), slow


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(F.dropout(torch.special.erfcx(x), 0.5, training=True))


def test_the_torch_func_path_refuses_randomness_and_batch_statistics():
    model = Noisy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="random numbers"):
            with regops.per_sample_grad_norms(model, "sum") as norms:
                model(torch.randn(3, 4)).sum().backward()
            _ = norms.total
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="couples the examples"):
        with regops.per_sample_grad_norms(bn, "sum"):
            bn(torch.randn(3, 4))


# ----------------------------------------------------------------------------------------------- autograd.Function
class _MatMulT(torch.autograd.Function):
    """``x @ w.t()`` with a hand-written backward: its forward runs without autograd, out of the tracker's view."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.transpose(-1, -2) @ x


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x.square() * g


class HiddenUse(nn.Module):
    """``w`` used twice: once by F.linear (seen), once through an autograd.Function (not seen); ``a.weight`` (a
    Linear with its rule) passed to the Function too, outside the Linear's forward."""

    def __init__(self, through: str) -> None:
        super().__init__()
        self.through = through
        self.a, self.w = nn.Linear(4, 4), nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.through == "parameter":
            return F.linear(_MatMulT.apply(h, self.w), self.w)
        if self.through == "computed":  # a tensor computed from parameters (a node) passed to the Function
            return F.linear(_MatMulT.apply(h, 0.5 * self.w.t()), self.w)
        return _MatMulT.apply(h, self.a.weight) + F.linear(h, self.w)


@pytest.mark.parametrize("through", ["parameter", "computed", "rule_layer"])
def test_a_parameter_passed_to_an_autograd_function_goes_to_torch_func_or_is_refused(through):
    """Norms that left out a use regops cannot see were wrong, silently (the Function's share of the gradient was
    missing). Such a forward now takes the torch.func path; a Function that cannot run there is refused by name."""
    torch.manual_seed(0)
    model = HiddenUse(through).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    names = "'a.weight'" if through == "rule_layer" else "'w'"
    match = rf"\[{names}\] passed to the torch.autograd.Function _MatMulT .*cannot run under torch.func"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            with regops.per_sample_grad_norms(model, "sum") as norms:
                model(x).square().sum().backward()
            _ = norms.total
        model.zero_grad(set_to_none=True)
        with pytest.raises(ValueError, match=match):
            with regops.dp_clipping(model, max_norm=1.0, loss_reduction="sum"):
                model(x).square().sum().backward()


class _MatMulTFunc(torch.autograd.Function):
    """``x @ w.t()`` written for torch.func (setup_context, a generated vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w):
        return x @ w.t()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.transpose(-1, -2) @ x


class FuncUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.w = nn.Linear(4, 4), nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return _MatMulTFunc.apply(h, self.w) + F.linear(h, self.w)


def test_a_parameter_passed_to_a_torch_func_ready_function_is_exact_by_torch_func():
    torch.manual_seed(0)
    slow = _check(FuncUse().double(), torch.randn(4, 4, dtype=torch.float64), _sq, fast=False)
    assert all("passed to the torch.autograd.Function _MatMulTFunc" in w for w in slow), slow


def test_a_parameter_passed_to_an_autograd_function_in_the_loss_is_refused_before_the_backward():
    """Outside the model's forward (in the loss) no path can attribute the use: the backward is refused, p.grad
    untouched."""
    torch.manual_seed(0)
    model = HiddenUse("parameter").double()
    model.forward = lambda x: F.linear(torch.tanh(model.a(x)), model.w)
    x = torch.randn(3, 4, dtype=torch.float64)
    for block in (
        lambda: regops.per_sample_grad_norms(model, "sum"),
        lambda: regops.dp_clipping(model, max_norm=1.0, loss_reduction="sum"),
    ):
        with pytest.raises(RuntimeError, match=r"\['w'\] are passed to the torch.autograd.Function _MatMulT outside"):
            with block():
                _MatMulT.apply(model(x), model.w).square().sum().backward()
        assert all(p.grad is None for p in model.parameters())


class FunctionLinear(nn.Module):
    """A layer whose forward calls an autograd.Function on its own weight, taught to regops by a registered rule."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return _MatMulT.apply(x, self.weight) + self.bias


class FunctionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = FunctionLinear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(_Cube.apply(self.a(x)))


def test_autograd_functions_on_examples_or_inside_a_ruled_layer_stay_exact(monkeypatch):
    """No false refusal: a Function on the examples only (no parameter passed), and one inside a layer whose
    registered rule accounts for it, are exact on the fast path."""
    from regops.per_example import _rules

    monkeypatch.setitem(_rules._RULES, FunctionLinear, regops.per_example.rule_for(nn.Linear(1, 1)))
    torch.manual_seed(0)
    _check(FunctionModel().double(), torch.randn(4, 4, dtype=torch.float64), _sq)
