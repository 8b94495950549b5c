"""Data valuation: regops' exact ghost inner products and Fisher diagonals against materialized per-example
gradients.

Cases (every variant computes the same exact numbers):

* ``per_sample_grad_dots`` MLP (4 x Linear of width 1024, 256 train x 256 test examples) and a 2-block
  transformer (T = 128, 64 x 64): ``regops`` against ``torch.func`` (``vmap(grad)`` per-example gradients of
  both batches materialized as ``[B, P]``, then one GEMM) and ``loop`` (one backward per example);
* ``empirical_fisher_diagonal`` on the MLP (256 examples): ``regops`` against BackPACK (``BatchGrad`` squared and
  summed, and its ``SumGradSquared``) and ``torch.func``.

The harness reports time and peak memory per variant. ``python -m benchmarks.valuation`` runs the
paired CPU comparison of the MLP case (the issue's bar: >= 20x faster than torch.func, lower peak memory), the
memory bar on both models (peak within 1.2x that of a plain forward and backward of the training batch; the
chunked stream against the whole batches) and the rank agreement of TRAK-style randomly projected inner products
with the exact ones.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import regops
from benchmarks.grad_norms import Transformer, _mlp
from benchmarks.harness import PeerMissing, PeerRefused, Setup, case, peer

CONFIGS = {
    "mlp": {
        False: dict(widths=[1024, 1024, 1024, 1024, 10], train=256, test=256),
        True: dict(widths=[128, 128, 128, 128, 10], train=32, test=32),
    },
    "transformer": {
        False: dict(vocab=5000, d=256, hidden=1024, seq=128, train=64, test=64),
        True: dict(vocab=500, d=32, hidden=64, seq=16, train=8, test=8),
    },
}


def _data(kind: str, cfg: dict, n: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(n, cfg["widths"][0], generator=gen)
        y = torch.randint(0, cfg["widths"][-1], (n,), generator=gen)
    else:
        x = torch.randint(0, cfg["vocab"], (n, cfg["seq"]), generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
    return x.to(device), y.to(device)


def make(kind: str, cfg: dict, device: torch.device):
    torch.manual_seed(0)
    model = _mlp(cfg["widths"]) if kind == "mlp" else Transformer(cfg["vocab"], cfg["d"], cfg["hidden"])
    return model.to(device), _data(kind, cfg, cfg["train"], 1, device), _data(kind, cfg, cfg["test"], 2, device)


def _regops_dots(model, train, test):
    def run():
        return regops.per_sample_grad_dots(model, F.cross_entropy, train, test, loss_reduction="mean")

    return run


def _func_grads(model, x, y) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` per-example gradients materialized by ``vmap(grad)``."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_n(p, xn, yn):
        return F.cross_entropy(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    return vmap(grad(loss_n), in_dims=(None, 0, 0))(params, x, y)


def _torch_func_dots(model, train, test):
    def run():
        g1, g2 = _func_grads(model, *train), _func_grads(model, *test)  # both [B, P], no concatenated copy
        return sum(g1[k].flatten(1) @ g2[k].flatten(1).T for k in g1)

    return run


def _loop_grads(model, x, y) -> torch.Tensor:
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _loop_dots(model, train, test):
    params = list(model.parameters())
    x, y = train

    def run():
        g2 = _loop_grads(model, *test)  # [B2, P]
        rows = []
        for i in range(x.shape[0]):  # one training example at a time against the stored test gradients
            gs = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            rows.append(torch.cat([g.flatten() for g in gs]) @ g2.T)
        return torch.stack(rows)

    return run


DOTS = {"regops": _regops_dots, "torch.func": _torch_func_dots, "loop": _loop_dots}


def _regops_fisher(model, batch):
    def run():
        return regops.empirical_fisher_diagonal(model, F.cross_entropy, [batch], loss_reduction="mean")

    return run


def _func_fisher(model, batch):
    def run():
        return {k: g.square().mean(0) for k, g in _func_grads(model, *batch).items()}

    return run


def _backpack_batchgrad(model, batch):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    x, y = batch

    def run():
        model.zero_grad(set_to_none=True)
        with backpack(BatchGrad()):
            loss_fn(model(x), y).backward()
        return {n: p.grad_batch.square().mean(0) for n, p in model.named_parameters()}

    return run


def _backpack_sumgradsq(model, batch):
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    x, y = batch

    def run():
        model.zero_grad(set_to_none=True)
        with backpack(SumGradSquared()):
            loss_fn(model(x), y).backward()
        return {n: p.sum_grad_squared / x.shape[0] for n, p in model.named_parameters()}

    return run


FISHER = {
    "regops": _regops_fisher,
    "backpack-batchgrad": _backpack_batchgrad,
    "backpack-sumgradsq": _backpack_sumgradsq,
    "torch.func": _func_fisher,
}


def _raises(exc: Exception):
    def run():
        raise exc

    return run


PEERS = ("backpack",)


def _build(variants: dict, model: nn.Module, *args) -> dict:
    """Every variant on its own copy of ``model``. regops and the torch baselines raise on any error; a peer that
    is missing or refuses gives a variant that raises :class:`PeerMissing` / :class:`PeerRefused` (a row that
    says why)."""
    out = {}
    for name, build in variants.items():
        if not name.startswith(PEERS):
            out[name] = build(copy.deepcopy(model), *args)
            continue
        try:
            out[name] = peer(build(copy.deepcopy(model), *args), name)
        except PeerMissing as exc:
            out[name] = _raises(exc)
        except Exception as exc:  # the peer refuses this model while wrapping it
            out[name] = _raises(PeerRefused(f"{name}: {type(exc).__name__}: {exc}"))
    return out


def _params_str(cfg: dict, quick: bool) -> str:
    s = " ".join(f"{k}={v}" for k, v in cfg.items() if k != "widths")
    if "widths" in cfg:
        s = "-".join(map(str, cfg["widths"])) + " " + s
    return s + (" quick" if quick else "")


for _kind, _cfgs in CONFIGS.items():
    for _quick, _cfg in _cfgs.items():

        def _make_dots(device, is_quick, kind=_kind, cfg=_cfg, quick=_quick):
            if is_quick != quick:
                return None
            model, train, test = make(kind, cfg, device)
            n_params = sum(p.numel() for p in model.parameters())
            return Setup(
                _build(DOTS, model, train, test),
                bytes=4 * n_params,
                note=f"{cfg['train']} x {cfg['test']} examples, {n_params / 1e6:.2f}M params",
            )

        case("valuation", f"per_sample_grad_dots {_kind}", _params_str(_cfg, _quick), devices=("cpu", "cuda"))(
            _make_dots
        )

for _quick, _cfg in CONFIGS["mlp"].items():

    def _make_fisher(device, is_quick, cfg=_cfg, quick=_quick):
        if is_quick != quick:
            return None
        model, train, _ = make("mlp", cfg, device)
        n_params = sum(p.numel() for p in model.parameters())
        return Setup(_build(FISHER, model, train), bytes=8 * n_params, note=f"{cfg['train']} examples")

    case("valuation", "empirical_fisher_diagonal mlp", _params_str(_cfg, _quick), devices=("cpu", "cuda"))(_make_fisher)


# ------------------------------------------------------------------------------------------ paired timing
def paired(quick: bool = False, rounds: int = 5, loop: bool = True) -> dict:
    """The MLP bar on CPU: regops and torch.func (and the loop) timed back to back, exactness, peak memory."""
    import statistics
    import time

    from benchmarks.harness import interleaved, peak_memory

    device = torch.device("cpu")
    cfg = CONFIGS["mlp"][quick]
    model, train, test = make("mlp", cfg, device)
    fns = {k: v(model, train, test) for k, v in DOTS.items() if loop or k != "loop"}
    exact: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for name, fn in fns.items():  # the first call of each; the loop (slow) is timed on this call only
        t0 = time.perf_counter()
        exact[name] = fn()
        if name == "loop":
            times[name].append(time.perf_counter() - t0)
        print(f"first call {name}: {time.perf_counter() - t0:.2f} s", flush=True)
    for name, ts in interleaved({name: fns[name] for name in ("regops", "torch.func")}, rounds).items():
        times[name] += ts
    peak_memory(fns["regops"], device)  # the profiler's first session misses blocks allocated before it
    peaks = {name: peak_memory(fns[name], device) for name in ("regops", "torch.func")}
    if loop:
        peaks["loop"] = None  # not measured: one more pass of the loop costs minutes on a shared CPU

    def plain():  # one ordinary forward + backward of the training batch: the memory yardstick
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(train[0]), train[1]).backward()

    plain_peak = peak_memory(plain, device)
    model.zero_grad(set_to_none=True)
    ref = exact["torch.func"].double()
    out = {
        "config": cfg,
        "threads": torch.get_num_threads(),
        "plain_fwd_bwd_peak_MB": plain_peak / 2**20,
        "variants": {},
    }
    for name in fns:
        med = statistics.median(times[name])
        out["variants"][name] = {
            "median_ms": med * 1e3,
            "min_ms": min(times[name]) * 1e3,
            "speedup_vs_torch.func": statistics.median(times["torch.func"]) / med,
            "peak_MB": None if peaks[name] is None else peaks[name] / 2**20,
            "max_rel_diff_vs_torch.func": float((exact[name].double() - ref).abs().max() / ref.abs().max()),
            "runs": len(times[name]),
        }
    return out


def memory_bar(quick: bool = False, rounds: int = 5) -> dict:
    """The memory bar on CPU, both models: ``per_sample_grad_dots``' peak within 1.2x that of a plain forward and
    backward of the training batch. ``regops`` streams the batches in chunks of the size it chooses; ``regops
    whole batches`` (``chunk=`` the batch size) is the computation without chunks, timed back to back with it."""
    import statistics

    from benchmarks.harness import interleaved, peak_memory

    device = torch.device("cpu")
    out = {}
    for kind, cfgs in CONFIGS.items():
        cfg = cfgs[quick]
        model, train, test = make(kind, cfg, device)
        whole = max(cfg["train"], cfg["test"])

        def dots(chunk=None, model=model, train=train, test=test):
            return regops.per_sample_grad_dots(model, F.cross_entropy, train, test, loss_reduction="mean", chunk=chunk)

        def plain(model=model, train=train):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(train[0]), train[1]).backward()

        fns = {"regops": dots, "regops whole batches": lambda dots=dots, whole=whole: dots(whole)}
        exact = {name: fn() for name, fn in fns.items()}
        times = interleaved(fns, rounds)
        peak_memory(plain, device)  # the profiler's first session misses blocks allocated before it
        model.zero_grad(set_to_none=True)  # else the measured step frees the gradients before it makes them again
        plain_peak = peak_memory(plain, device)
        model.zero_grad(set_to_none=True)
        ref = exact["regops whole batches"].double()
        row = {"config": cfg, "plain_fwd_bwd_peak_MB": plain_peak / 2**20, "variants": {}}
        for name, fn in fns.items():
            peak = peak_memory(fn, device)
            row["variants"][name] = {
                "median_ms": statistics.median(times[name]) * 1e3,
                "min_ms": min(times[name]) * 1e3,
                "peak_MB": peak / 2**20,
                "peak_vs_plain": peak / plain_peak,
                "max_rel_diff_vs_whole": float((exact[name].double() - ref).abs().max() / ref.abs().max()),
                "runs": rounds,
            }
        out[kind] = row
    return out


def projection_ranking(quick: bool = False, dims: tuple[int, ...] = (256, 1024, 4096), seed: int = 0) -> dict:
    """How well TRAK-style randomly projected gradient inner products rank against the exact ones: Spearman
    correlation per test example (mean) and top-10 proponent overlap, for several projection dimensions."""
    cfg = CONFIGS["mlp"][True] if quick else dict(widths=[256, 256, 256, 10], train=256, test=32)
    model, train, test = make("mlp", cfg, torch.device("cpu"))
    model = model.double()
    exact = regops.per_sample_grad_dots(
        model, F.cross_entropy, (train[0].double(), train[1]), (test[0].double(), test[1]), loss_reduction="mean"
    )
    g1 = torch.cat([g.flatten(1) for g in _func_grads(model, train[0].double(), train[1]).values()], 1)
    g2 = torch.cat([g.flatten(1) for g in _func_grads(model, test[0].double(), test[1]).values()], 1)
    gen = torch.Generator().manual_seed(seed)

    def ranks(x):
        return x.argsort(0).argsort(0).double()

    out = {"config": cfg, "dims": {}}
    k = 10
    for dim in dims:
        proj = torch.randn(g1.shape[1], dim, generator=gen, dtype=torch.float64) / dim**0.5
        approx = (g1 @ proj) @ (g2 @ proj).T
        re, ra = ranks(exact), ranks(approx)
        re, ra = re - re.mean(0), ra - ra.mean(0)
        spearman = ((re * ra).sum(0) / (re.norm(dim=0) * ra.norm(dim=0))).mean().item()
        top_e, top_a = exact.topk(k, dim=0).indices, approx.topk(k, dim=0).indices
        overlap = sum(len(set(top_e[:, j].tolist()) & set(top_a[:, j].tolist())) for j in range(exact.shape[1]))
        out["dims"][dim] = {"spearman": spearman, f"top{k}_overlap": overlap / (k * exact.shape[1])}
    return out


def main() -> None:
    import argparse

    from benchmarks.harness import RESULTS_DIR, device_slug, environment, record

    parser = argparse.ArgumentParser(description="paired CPU timing of per_sample_grad_dots (MLP) vs torch.func")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--no-loop", action="store_true", help="skip the per-example loop (minutes on a CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    result = {"environment": environment(device), "mlp": paired(args.quick, args.rounds, not args.no_loop)}
    print(f"plain forward+backward of the training batch: peak {result['mlp']['plain_fwd_bwd_peak_MB']:.1f} MB")
    for name, row in result["mlp"]["variants"].items():
        peak = "-" if row["peak_MB"] is None else f"{row['peak_MB']:.1f}"
        print(
            f"mlp {name:11s} median {row['median_ms']:9.1f} ms  min {row['min_ms']:9.1f} ms  "
            f"x{row['speedup_vs_torch.func']:7.1f} vs torch.func  peak {peak} MB  "
            f"rel diff {row['max_rel_diff_vs_torch.func']:.1e}"
        )
    result["memory"] = memory_bar(args.quick, args.rounds)
    for kind, row in result["memory"].items():
        for name, v in row["variants"].items():
            print(
                f"{kind} {name:20s} peak {v['peak_MB']:7.1f} MB = {v['peak_vs_plain']:.2f}x plain "
                f"({row['plain_fwd_bwd_peak_MB']:.1f} MB)  median {v['median_ms']:8.1f} ms  min {v['min_ms']:8.1f} ms  "
                f"rel diff vs whole {v['max_rel_diff_vs_whole']:.1e}"
            )
    result["projection"] = projection_ranking(args.quick)
    for dim, row in result["projection"]["dims"].items():
        print(f"projection dim {dim:5d}: spearman {row['spearman']:.3f}  top-10 overlap {row['top10_overlap']:.3f}")
    threads = "" if args.threads == 1 else f"-{args.threads}-threads"
    out = RESULTS_DIR / device_slug(device) / f"valuation-paired{threads}{'-quick' if args.quick else ''}.json"
    record(out, result)  # appended: every run is kept
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
