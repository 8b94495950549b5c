"""Hessian estimates: regops (batched probes, fused accumulation) against a sequential double-backward loop
("eager"), PyHessian and curvlinops at an equal number of probes; exact Gauss-Newton trace against one plain
forward+backward and BackPACK's exact GGN diagonal.

Model of the issue's bar: a ReLU MLP 784-256-256-10, batch 256, cross-entropy. Every Hutchinson variant
spends ``K`` Hessian-vector products, so ``ms / K`` is the time per probe; the variant ``fwd+bwd`` is one plain
forward+backward, the unit the bar is stated in. The variants are built in one place so they see the same
model and data.
"""

from __future__ import annotations

import torch
from torch import nn

import regops
from benchmarks.harness import PeerMissing, PeerRefused, Setup, case, compiled, peer

CONFIGS = {  # (device type, quick) -> (sizes, batch, probes)
    ("cpu", False): ((784, 256, 256, 10), 256, 32),
    ("cpu", True): ((64, 32, 10), 32, 8),
    ("cuda", False): ((784, 256, 256, 10), 256, 64),
    ("cuda", True): ((784, 256, 256, 10), 256, 16),
}


def _mlp(sizes, device, act=nn.ReLU) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(device)


def _problem(device: torch.device, quick: bool):
    sizes, batch, probes = CONFIGS[(device.type, quick)]
    model = _mlp(sizes, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=gen).to(device)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen).to(device)
    return model, nn.CrossEntropyLoss(), x, y, probes, f"mlp {'-'.join(map(str, sizes))} B={batch}"


def _fwd_bwd(model, crit, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda: torch.autograd.grad(crit(model(x), y), params)


def _loop_trace(model, crit, x, y, probes: int, diag: bool = False):
    """The baseline: one double backward per probe, Rademacher probes from torch, a sum on the host."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        grads = torch.autograd.grad(crit(model(x), y), params, create_graph=True)
        total = 0.0
        acc = [torch.zeros_like(p) for p in params] if diag else None
        for _ in range(probes):
            vs = [torch.randint_like(p, 2) * 2 - 1 for p in params]
            hv = torch.autograd.grad(grads, params, vs, retain_graph=True)
            total += sum((h * v).sum() for h, v in zip(hv, vs, strict=True)).item()
            if diag:
                for a, h, v in zip(acc, hv, vs, strict=True):
                    a.add_(h * v)
        return total / probes

    return run


def _pyhessian(model, crit, x, y, probes: int):
    from pyhessian import hessian

    def run():
        # tol=0: never stops early, so it spends exactly `probes` products; construction does fwd+bwd.
        h = hessian(model, crit, data=(x, y), cuda=x.is_cuda)
        return h.trace(maxIter=probes, tol=0.0)

    return run


def _curvlinops(model, crit, x, y, probes: int, diag: bool = False):
    from curvlinops import HessianLinearOperator, hutchinson_diag, hutchinson_trace

    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        op = HessianLinearOperator(model, crit, params, [(x, y)], check_deterministic=False)
        return (hutchinson_diag if diag else hutchinson_trace)(op, probes)

    return run


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _register_trace(quick: bool) -> None:
    for device_type in ("cpu", "cuda"):
        sizes, batch, probes = CONFIGS[(device_type, quick)]
        params = f"mlp {'-'.join(map(str, sizes))} B={batch} K={probes}" + (" quick" if quick else "")

        def make(device, is_quick, quick=quick, device_type=device_type):
            if is_quick != quick or device.type != device_type:
                return None
            model, crit, x, y, k, _ = _problem(device, quick)
            gen = torch.Generator(device=device.type).manual_seed(2)
            variants = {
                "regops": lambda: regops.hessian.trace(
                    model, crit, x, y, num_probes=k, probe_batch=min(k, 32), generator=gen
                ),
                "regops fwd-over-rev": lambda: regops.hessian.trace(
                    model,
                    crit,
                    x,
                    y,
                    num_probes=k,
                    probe_batch=min(k, 32),
                    hvp="forward_over_reverse",
                    generator=gen,
                ),
                "regops hutch++": lambda: regops.hessian.trace(
                    model, crit, x, y, num_probes=k, method="hutch++", probe_batch=min(k, 32), generator=gen
                ),
                "regops finite-diff": lambda: regops.hessian.trace(
                    model, crit, x, y, num_probes=k, hvp="finite_difference", generator=gen
                ),
                "eager": _loop_trace(model, crit, x, y, k),
                "pyhessian": peer(_pyhessian(model, crit, x, y, k), "pyhessian"),
                "curvlinops": peer(_curvlinops(model, crit, x, y, k), "curvlinops"),
                "fwd+bwd": _fwd_bwd(model, crit, x, y),
            }
            note = f"K={k} probes per call (ms/K = per probe); eager = sequential double-backward loop"
            return Setup(variants, bytes=k * 2 * _param_bytes(model), note=note)

        case("hessian", "trace", params, devices=(device_type,))(make)


def _register_diag(quick: bool) -> None:
    for device_type in ("cpu", "cuda"):
        sizes, batch, probes = CONFIGS[(device_type, quick)]
        params = f"mlp {'-'.join(map(str, sizes))} B={batch} K={probes}" + (" quick" if quick else "")

        def make(device, is_quick, quick=quick, device_type=device_type):
            if is_quick != quick or device.type != device_type:
                return None
            model, crit, x, y, k, _ = _problem(device, quick)
            gen = torch.Generator(device=device.type).manual_seed(3)
            variants = {
                "regops": lambda: regops.hessian.diagonal(
                    model, crit, x, y, num_probes=k, probe_batch=min(k, 32), generator=gen
                ),
                "eager": _loop_trace(model, crit, x, y, k, diag=True),
                "curvlinops": peer(_curvlinops(model, crit, x, y, k, diag=True), "curvlinops"),
                "fwd+bwd": _fwd_bwd(model, crit, x, y),
            }
            return Setup(variants, bytes=k * 2 * _param_bytes(model), note=f"K={k}; eager = sequential loop")

        case("hessian", "diagonal", params, devices=(device_type,))(make)


def _register_probes(quick: bool) -> None:
    for device_type in ("cpu", "cuda"):
        numel = 1 << (16 if quick else 20)
        k = 16
        params = f"N={numel} K={k}" + (" quick" if quick else "")

        def make(device, is_quick, quick=quick, device_type=device_type, numel=numel, k=k):
            if is_quick != quick or device.type != device_type:
                return None
            w = torch.zeros(numel, device=device)
            gen = torch.Generator(device=device.type).manual_seed(4)
            hv = torch.randn(k, numel, device=device)
            v = torch.randint(0, 2, (k, numel), device=device, dtype=torch.float32) * 2 - 1
            sizes = [numel // 4, numel // 4, numel // 2]
            vs, hvs = list(v.split(sizes, 1)), list(hv.split(sizes, 1))
            from regops.hessian import ops

            def rademacher():  # what a user writes: the draw in the target dtype, then the affine map
                return torch.randint(0, 2, (k, numel), device=device, dtype=torch.float32) * 2 - 1

            def rademacher_bernoulli():
                return torch.empty(k, numel, device=device).bernoulli_(0.5) * 2 - 1

            def gaussian():
                return torch.randn(k, numel, device=device)

            def probe_dot(v, hv):
                vh = v * hv
                return torch.stack([c.sum(1) for c in vh.split(sizes, 1)], 1), vh.sum(0), (vh**2).sum(0)

            compiled_dot = compiled(probe_dot)
            variants = {
                "regops": lambda: regops.hessian.probes([w], k, generator=gen),
                "regops gaussian": lambda: regops.hessian.probes([w], k, distribution="gaussian", generator=gen),
                "eager": rademacher,
                "compile": compiled(rademacher),
                "eager bernoulli": rademacher_bernoulli,
                "compile bernoulli": compiled(rademacher_bernoulli),
                "eager gaussian": gaussian,
                "compile gaussian": compiled(gaussian),
                "regops probe_dot": lambda: ops.hessian_probe_dot(vs, hvs, True),
                "eager probe_dot": lambda: probe_dot(v, hv),
                "compile probe_dot": lambda: compiled_dot(v, hv),
            }
            return Setup(variants, bytes=k * numel * 4, note="probe generation and the fused accumulation")

        case("hessian", "probes", params, devices=(device_type,))(make)


for _quick in (False, True):
    _register_trace(_quick)
    _register_diag(_quick)
    _register_probes(_quick)


def _backpack_ggn_trace(model, x, y):
    extended: dict[str, nn.Module] = {}

    def run():
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact

        if not extended:  # once (BackPACK extends the modules in place)
            extended.update(model=extend(model), crit=extend(nn.CrossEntropyLoss()))
        crit, extended_model = extended["crit"], extended["model"]
        loss = crit(extended_model(x), y)
        with backpack(DiagGGNExact()):
            loss.backward()
        total = sum(p.diag_ggn_exact.sum() for p in extended_model.parameters())
        for p in extended_model.parameters():
            p.grad = None
        return total

    return peer(run, "backpack")


def _register_ggn(quick: bool) -> None:
    for device_type in ("cpu", "cuda"):
        sizes, batch, _ = CONFIGS[(device_type, quick)]
        params = f"relu mlp {'-'.join(map(str, sizes))} B={batch} CE" + (" quick" if quick else "")

        def make(device, is_quick, quick=quick, device_type=device_type):
            if is_quick != quick or device.type != device_type:
                return None
            model, crit, x, y, _, _ = _problem(device, quick)
            exact = regops.hessian.ggn_trace(model, x, y).item()
            peer = _mlp(CONFIGS[(device.type, quick)][0], device)
            backpack_run = _backpack_ggn_trace(peer, x, y)
            try:
                agreement = f"; |regops - backpack| / backpack = {abs(exact - backpack_run().item()) / exact:.1e}"
            except (PeerMissing, PeerRefused) as exc:  # reported by its variant too
                agreement = f"; backpack unavailable ({exc})"
            gen = torch.Generator(device=device.type).manual_seed(5)
            variants = {
                "regops": lambda: regops.hessian.ggn_trace(model, x, y),
                "regops mc": lambda: regops.hessian.ggn_trace(model, x, y, method="mc", generator=gen),
                "backpack": backpack_run,
                "eager": _fwd_bwd(model, crit, x, y),
            }
            note = f"exact GGN trace = {exact:.6g}{agreement}; eager = one plain forward+backward (the bar's unit)"
            return Setup(variants, bytes=_param_bytes(model), note=note)

        case("hessian", "ggn trace", params, devices=(device_type,))(make)


for _quick in (False, True):
    _register_ggn(_quick)
