"""Per-example gradient norms: regops (one backward) against a plain forward+backward and the peers.

Variants, each a full step on the same model and batch (its own copy of the weights):

* ``eager``: plain forward + backward (the bar: regops must stay within 1.15x (MLP) / 1.35x (transformer));
* ``regops``: the same with ``per_sample_grad_norms`` recording the norms;
* ``regops-clip``: norms + ``clip_per_sample_`` (DP-SGD clipping and noise by Book-Keeping, one backward);
* ``regops-dp``: the ``dp_clipping`` block (the same, with autograd's Linear weight gradients skipped);
* ``opacus-hooks``: Opacus GradSampleModule (materializes B x P per-sample gradients), then their norms;
* ``opacus-ghost``: Opacus GradSampleModuleFastGradientClipping norms (ghost for Linear/Embedding);
* ``torch.func``: ``vmap(grad)`` of the per-example loss, then norms;
* ``backpack``: BackPACK ``BatchL2Grad``.

``x_eager`` in the results is (eager time) / (variant time): the slowdown ratio is its inverse.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import regops
from benchmarks.harness import PeerMissing, PeerRefused, Setup, case, peer


class Block(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(self.ln(h))))


class Transformer(nn.Module):
    """The issue's small transformer: Embedding, 2 x (LayerNorm, Linear, GELU, Linear), mean-pool, Linear."""

    def __init__(self, vocab: int, d: int, hidden: int, classes: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Block(d, hidden), Block(d, hidden))
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.emb(ids)).mean(1))


class GPT2Logits(nn.Module):
    """Hugging Face ``GPT2LMHeadModel`` (tied LM head, Conv1D projections, broadcast position embeddings)
    returning ``[B, V, T]`` logits, so that ``F.cross_entropy(out, ids [B, T])`` is the token-mean LM loss."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab,
            n_positions=seq,
            n_embd=d,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.lm = GPT2LMHeadModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits.transpose(1, 2)


def _mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


CONFIGS = {
    # name -> (quick, builder, params)
    "mlp": {
        False: dict(widths=[784, 1024, 1024, 1024, 10], batch=256),
        True: dict(widths=[784, 128, 128, 10], batch=32),
    },
    "transformer": {
        False: dict(vocab=5000, d=256, hidden=1024, batch=32, seq=128),
        True: dict(vocab=500, d=64, hidden=128, batch=4, seq=32),
    },
    # GPT-2's tokenizer vocabulary, width 256, T = 128 (the issue's bar: <= 1.3x a plain step on CPU)
    "gpt2": {
        False: dict(vocab=50257, d=256, layers=4, heads=4, batch=8, seq=128),
        True: dict(vocab=1000, d=64, layers=2, heads=2, batch=2, seq=32),
    },
}


def _make_model_and_batch(kind: str, cfg: dict, device: torch.device):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if kind == "mlp":
        model = _mlp(cfg["widths"])
        x = torch.randn(cfg["batch"], cfg["widths"][0], generator=gen)
        y = torch.randint(0, cfg["widths"][-1], (cfg["batch"],), generator=gen)
    elif kind == "gpt2":
        model = GPT2Logits(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"])
        x = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)
        y = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)
    else:
        model = Transformer(cfg["vocab"], cfg["d"], cfg["hidden"])
        x = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)
        y = torch.randint(0, 10, (cfg["batch"],), generator=gen)
    return model.to(device), x.to(device), y.to(device)


def _plain(model, x, y):
    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return run


def _regops(model, x, y):
    def run():
        model.zero_grad(set_to_none=True)
        with regops.per_sample_grad_norms(model, "mean") as norms:
            F.cross_entropy(model(x), y).backward()
        return norms.total

    return run


def _regops_clip(model, x, y):
    gen = torch.Generator(device=x.device).manual_seed(0)

    def run():
        model.zero_grad(set_to_none=True)
        with regops.per_sample_grad_norms(model, "mean", retain_signals=True) as norms:
            F.cross_entropy(model(x), y).backward()
        return regops.clip_per_sample_(norms, max_norm=1.0, noise_multiplier=1.0, generator=gen)

    return run


def _regops_dp(model, x, y):
    gen = torch.Generator(device=x.device).manual_seed(0)

    def run():
        model.zero_grad(set_to_none=True)
        with regops.dp_clipping(
            model, max_norm=1.0, loss_reduction="mean", noise_multiplier=1.0, generator=gen
        ) as clip:
            F.cross_entropy(model(x), y).backward()
        return clip.clip_factors

    return run


def _opacus_hooks(model, x, y):
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="mean")

    def run():
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y).backward()
        sq = [p.grad_sample.flatten(1).square().sum(1) for p in model.parameters()]
        for p in model.parameters():
            p.grad_sample = None
        return torch.stack(sq).sum(0).sqrt()

    return run


def _opacus_ghost(model, x, y):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="mean", use_ghost_clipping=True)

    def run():
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y).backward()
        return gsm.get_norm_sample()

    return run


def _torch_func(model, x, y):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_n(p, xn, yn):
        return F.cross_entropy(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    per_example = vmap(grad(loss_n), in_dims=(None, 0, 0))

    def run():
        grads = per_example(params, x, y)
        return torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()

    return run


def _backpack(model, x, y):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())

    def run():
        model.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad()):
            loss_fn(model(x), y).backward()
        # BackPACK has no LayerNorm extension: those parameters get no batch_l2 (their norms are left out).
        sq = [p.batch_l2 for p in model.parameters() if hasattr(p, "batch_l2")]
        return torch.stack(sq).sum(0).sqrt()

    return run


VARIANTS = {
    "eager": _plain,
    "regops": _regops,
    "regops-clip": _regops_clip,
    "regops-dp": _regops_dp,
    "opacus-ghost": _opacus_ghost,
    "backpack": _backpack,
    "torch.func": _torch_func,
    "opacus-hooks": _opacus_hooks,
}


def _build(name: str, model: nn.Module, x, y):
    """The variant ``name`` on ``model``. regops' own variants and the eager baseline raise on any error; a peer
    that is missing or refuses the model (Opacus's ghost clipping and tied weights, ...) gives a variant that
    raises :class:`PeerMissing` / :class:`PeerRefused` with the reason, which the harness reports as a row."""
    if name == "eager" or name.startswith("regops"):
        return VARIANTS[name](model, x, y)
    try:
        return peer(VARIANTS[name](model, x, y), name)
    except PeerMissing as exc:
        return _raises(exc)
    except Exception as exc:  # the peer refuses this model while wrapping it
        return _raises(PeerRefused(f"{name}: {type(exc).__name__}: {exc}"))


def _setup(kind: str, cfg: dict, device: torch.device) -> Setup:
    base, x, y = _make_model_and_batch(kind, cfg, device)
    variants = {name: _build(name, copy.deepcopy(base), x, y) for name in VARIANTS}
    n_params = sum(p.numel() for p in base.parameters())
    tokens = x.numel() if kind in ("transformer", "gpt2") else x.shape[0]
    return Setup(
        variants,
        bytes=3 * 4 * n_params,  # weights read forward and backward, gradients written
        flops=6 * tokens * n_params,
        note=f"B={x.shape[0]} fwd+bwd, {n_params / 1e6:.2f}M params",
    )


def _raises(exc: Exception):
    def run():
        raise exc

    return run


for _kind, _cfgs in CONFIGS.items():
    for _quick, _cfg in _cfgs.items():
        _params = " ".join(f"{k}={v}" for k, v in _cfg.items() if k != "widths")
        if "widths" in _cfg:
            _params = "-".join(map(str, _cfg["widths"])) + " " + _params
        _params += " quick" if _quick else ""

        def _make(device, is_quick, kind=_kind, cfg=_cfg, quick=_quick):
            if is_quick != quick:
                return None
            return _setup(kind, cfg, device)

        case("grad_norms", f"per-example norms {_kind}", _params, devices=("cpu", "cuda"))(_make)


# ------------------------------------------------------------------------------------------ paired timing
def paired(
    kind: str, quick: bool = False, rounds: int = 15, slow_rounds: int = 3, variants: list[str] | None = None
) -> dict:
    """Slowdown of each variant against a plain forward+backward timed right next to it.

    On a shared machine a variant timed in its own window (as the harness does) sees different load than the
    baseline; here every round times every variant back to back, and the ratios use the per-round medians and
    minima. The slow peers (``torch.func``, ``opacus-hooks``) get ``slow_rounds`` rounds.
    """
    import statistics
    import time

    from benchmarks.harness import peak_memory

    cfg = CONFIGS[kind][quick]
    device = torch.device("cpu")
    base, x, y = _make_model_and_batch(kind, cfg, device)
    fns = {}
    for name in VARIANTS:
        if variants is not None and name not in variants and name != "eager":
            continue
        fns[name] = _build(name, copy.deepcopy(base), x, y)
        try:
            fns[name]()
            fns[name]()
        except (PeerMissing, PeerRefused) as exc:
            fns[name] = exc
    times: dict[str, list[float]] = {k: [] for k, f in fns.items() if callable(f)}
    slow = {"torch.func", "opacus-hooks"}
    for r in range(rounds):
        for name in times:
            if name in slow and r >= slow_rounds:
                continue
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    eager_med, eager_min = statistics.median(times["eager"]), min(times["eager"])
    peak_memory(fns["eager"], device)  # the profiler's first session misses blocks allocated before it
    eager_peak = peak_memory(fns["eager"], device)
    out = {"config": cfg, "threads": torch.get_num_threads(), "variants": {}}
    for name, f in fns.items():
        if not callable(f):
            out["variants"][name] = {"error": f"{type(f).__name__}: {f}"[:200]}
            continue
        peak = eager_peak if name == "eager" else peak_memory(f, device)
        out["variants"][name] = {
            "median_ms": statistics.median(times[name]) * 1e3,
            "min_ms": min(times[name]) * 1e3,
            "ratio_median": statistics.median(times[name]) / eager_med,
            "ratio_min": min(times[name]) / eager_min,
            "peak_MB": None if peak is None else peak / 2**20,
            "peak_ratio": None if not (peak and eager_peak) else peak / eager_peak,
            "runs": len(times[name]),
        }
    return out


def main() -> None:
    import argparse

    from benchmarks.harness import RESULTS_DIR, device_slug, environment, record

    parser = argparse.ArgumentParser(description="paired per-example-norm timings against plain fwd+bwd")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--kinds", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--slow-rounds", type=int, default=3, help="rounds of the slow peers")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {list(VARIANTS)} (eager always)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    result = {"environment": environment(device)}
    for kind in args.kinds.split(","):
        chosen = args.variants.split(",") if args.variants else None
        result[kind] = paired(kind, args.quick, args.rounds, args.slow_rounds, chosen)
        for name, row in result[kind]["variants"].items():
            if "error" in row:
                print(f"{kind:12s} {name:13s} error: {row['error']}")
                continue
            print(
                f"{kind:12s} {name:13s} median {row['median_ms']:9.1f} ms  x{row['ratio_median']:.3f}   "
                f"min {row['min_ms']:9.1f} ms  x{row['ratio_min']:.3f}   peak {row['peak_MB'] or 0:8.1f} MB "
                f"x{row['peak_ratio'] or 0:.2f}"
            )
    suffix = "" if args.kinds == ",".join(CONFIGS) else "-" + args.kinds.replace(",", "-")
    out = RESULTS_DIR / device_slug(device) / f"grad_norms-paired{suffix}{'-quick' if args.quick else ''}.json"
    record(out, result)  # appended: every run is kept
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
