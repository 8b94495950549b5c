"""Test helpers: the tolerance table, comparison against references, input factories.

Low-precision rule (as flash-attention): a kernel's error against a high-precision reference may be at most
twice the error of the reference itself run in the low precision, plus a small floor per dtype.
"""

from __future__ import annotations

import torch

# (rtol, atol) for direct comparisons in each dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-4),
    torch.bfloat16: (8e-3, 1e-3),
}

# Floor added to the 2x rule, per dtype (absolute, on max-abs error).
ERROR_FLOOR: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **kwargs) -> None:
    """``torch.testing.assert_close`` with regops' per-dtype tolerances (of ``actual``'s dtype) by default."""
    if "rtol" not in kwargs and actual.dtype in TOLERANCES:
        kwargs.update(tolerance(actual.dtype))
    torch.testing.assert_close(actual, expected.to(actual.dtype), **kwargs)


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_lowp(kernel_out: torch.Tensor, ref_lowp: torch.Tensor, ref_high: torch.Tensor) -> None:
    """flash-attention rule: err(kernel) <= 2 * err(reference in the same dtype) + floor(dtype)."""
    err_kernel = max_abs_error(kernel_out, ref_high)
    err_ref = max_abs_error(ref_lowp, ref_high)
    bound = 2 * err_ref + ERROR_FLOOR[kernel_out.dtype]
    assert err_kernel <= bound, f"kernel error {err_kernel:.3g} > 2 * reference error {err_ref:.3g} + floor"


def make_tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    noncontiguous: bool = False,
    requires_grad: bool = False,
    seed: int = 0,
    low: float = -2.0,
    high: float = 2.0,
) -> torch.Tensor:
    """Reproducible random input; ``noncontiguous`` gives a strided view with the same logical values."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=gen)
    if noncontiguous and len(shape) >= 1:
        # Same logical values, every other element of a wider buffer along the last dim.
        wide = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=torch.float64)
        wide[..., ::2] = base
        t = wide.to(dtype=dtype, device=device)[..., ::2]
    else:
        t = base.to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


ODD_SIZES = (1, 63, 1000, 4097)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def seed(key: int, offset: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The int64 ``[2]`` seed tensor (Philox key, first counter) the ops take, from host ints."""
    return torch.tensor([key, offset], dtype=torch.int64, device=device)


def prob(p: float) -> torch.Tensor:
    """A probability as the ops take it: a 0-dim float64 tensor."""
    return torch.tensor(p, dtype=torch.float64)


def dp_noise(shapes: list[torch.Size], generator: torch.Generator, device: str | torch.device = "cpu") -> list:
    """The standard normal noise (float32) ``clip_per_sample_`` draws for tracked parameters of these shapes (in
    order) from ``generator``'s state, by the reference of :mod:`regops.hessian`'s probe stream (advances it)."""
    from regops._core import rng
    from regops.hessian import reference as ref

    sizes = [int(torch.Size(s).numel()) for s in shapes]
    n = sum(sizes)
    seed_ = rng.philox_seed(torch.device(device), ref.stream_words(1, n, "gaussian"), generator)
    row = ref.probes(seed_, 0, 1, n, "gaussian", torch.float32)[0, :n]
    return [z.reshape(s) for z, s in zip(row.split(sizes), shapes, strict=True)]


class ReferenceSAM(torch.optim.Optimizer):
    """The widely used reference SAM (davda54/sam), as published: a loop over the parameters, a copy of each; the
    oracle of the SAM tests and the per-tensor baseline of its benchmark."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        norms = [
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return torch.norm(torch.stack(norms), p=2)
