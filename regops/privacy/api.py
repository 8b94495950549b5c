"""DP-SGD in the shape Opacus users know: ``PrivacyEngine().make_private(...)`` returns the model, optimizer and
data loader that the user's unchanged loop drives (``loss.backward(); optimizer.step()``), with regops' one-backward
clipping (:func:`regops.dp_clipping`) underneath and Opacus's accountants (:class:`regops.PrivacyAccountant`)
keeping the books."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import IO, Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from regops.grad_norms import PrivacyAccountant, noise_multiplier_for
from regops.privacy._loader import BatchMemoryManager, DPDataLoader
from regops.privacy._step import (
    DPOptimizer,
    DPStep,
    PrivateModule,
    StepConfig,
    check_max_grad_norm,
    check_noise_multiplier,
    is_fsdp,
)

__all__ = ["BatchMemoryManager", "DPDataLoader", "DPOptimizer", "PrivacyEngine", "PrivateModule"]

ACCOUNTANTS = ("rdp", "prv", "gdp")
CLIPPINGS = ("flat", "per_layer")


class PrivacyEngine:
    r"""DP-SGD for an existing training loop, with Opacus's ``PrivacyEngine`` interface.

    `make_private` (or `make_private_with_epsilon`) wraps the model, the optimizer and the data loader;
    the loop stays ``optimizer.zero_grad(); criterion(model(x), y).backward(); optimizer.step()``. Each
    ``optimizer.step()`` sets every trainable ``p.grad`` to

    .. math:: \frac1E\Big(\sum_{n \in \text{batch}} \min\Big(1, \frac{C}{\|\nabla\ell_n\| + 10^{-6}}\Big)
              \nabla\ell_n + \mathcal N(0, \sigma^2 C^2 I)\Big)

    (``E`` the expected batch size, ``len(dataset) // len(data_loader)``; ``1`` for ``loss_reduction="sum"``)
    before the wrapped optimizer's step, from the one ordinary backward pass (Book-Keeping, no per-example
    gradients stored), and records the step with the accountant: `get_epsilon` gives what Opacus's
    accountant gives for the same history.

    Args:
        accountant: ``"prv"`` (Opacus's default), ``"rdp"`` or ``"gdp"``: Opacus's accountants.
        secure_mode: must be ``False``: noise and sampling come from ``torch.Generator``\ s, not a
            cryptographic generator.

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> dataset = torch.utils.data.TensorDataset(torch.randn(256, 20), torch.randint(0, 5, (256,)))
        >>> train_loader = torch.utils.data.DataLoader(dataset, batch_size=64)
        >>> privacy_engine = regops.PrivacyEngine()
        >>> model, optimizer, train_loader = privacy_engine.make_private(
        ...     module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.1, max_grad_norm=1.0)
        >>> for x, y in train_loader:  # the usual loop
        ...     optimizer.zero_grad()
        ...     F.cross_entropy(model(x), y).backward()
        ...     optimizer.step()
        >>> 0 < privacy_engine.get_epsilon(delta=1e-5) < 10
        True
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False) -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"regops: accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if secure_mode:
            raise NotImplementedError(
                "regops: secure_mode is not supported: the noise and the sampling come from torch.Generator, not a "
                "cryptographically secure generator"
            )
        self.accountant_name = accountant
        self._accountant: PrivacyAccountant | None = None  # built on first use: training does not need Opacus
        self.history: list[tuple[float, float, int]] = []  # (noise multiplier, sample rate, steps), as Opacus's
        self.sample_generator: torch.Generator | None = None
        self.noise_generator: torch.Generator | None = None
        self.dataset: Any = None

    # -- wrapping
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Mapping[str, float],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: torch.Generator | None = None,
        forms: str | Mapping[str, str] | None = None,
        unsupported: str = "error",
    ) -> tuple[PrivateModule, DPOptimizer, DataLoader]:
        """Wrap the training objects for DP-SGD; returns ``(model, optimizer, data_loader)``.

        Args:
            module: the model (a ``DistributedDataParallel`` or FSDP2 (``fully_shard``) model for distributed
                training: each rank then samples its shard and the clipped sums are averaged once per step).
            optimizer: any optimizer over (a subset of) ``module``'s parameters.
            data_loader: the loader to sample from: the Poisson rate is ``1 / len(data_loader)`` (the same
                expected batch size), ``len(data_loader)`` steps per pass.
            noise_multiplier: ``sigma >= 0``: the noise's standard deviation over ``max_grad_norm``.
            max_grad_norm: the clipping bound ``C > 0``; with ``clipping="per_layer"`` a float (every module the
                same bound) or ``{module name: bound}`` for the modules holding trainable parameters (noise then
                uses ``C = sqrt(sum of squared bounds)``).
            batch_first: the batch is dim 0 of the inputs (``False``: dim 1, sequence-first models).
            loss_reduction: how the loss combines a batch's examples: ``"mean"`` (``CrossEntropyLoss()``'s default;
                gradients divided by the expected batch size, not the realised one) or ``"sum"``.
            poisson_sampling: draw Poisson batches (`DPDataLoader`, the sampling the accounting assumes);
                ``False`` keeps ``data_loader`` (an approximation, as in Opacus).
            clipping: ``"flat"`` (one norm over all parameters) or ``"per_layer"`` (each module clipped to its bound).
            noise_generator: ``torch.Generator`` (on the parameters' device) of the noise; default: a new one seeded
                from torch's default generator. The sampling uses ``data_loader.generator``, or a new one seeded the
                same way (distributed: rank 0's state, broadcast to every rank); both are in `state_dict`.
            forms, unsupported: passed to `regops.dp_clipping` (per-layer norm forms; modules without a rule).
        """
        if isinstance(module, PrivateModule):
            module = module._module
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        if not isinstance(module, nn.Module):
            raise TypeError(f"regops: module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"regops: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"regops: data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
        if clipping not in CLIPPINGS:
            raise ValueError(f"regops: clipping must be one of {CLIPPINGS}, got {clipping!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"regops: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"regops: batch_first must be a bool, got {batch_first!r}")
        per_layer = clipping == "per_layer"
        sigma = check_noise_multiplier(noise_multiplier)
        bound = check_max_grad_norm(max_grad_norm, per_layer)
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("regops: the module has no trainable parameter")
        _check_optimizer_params(module, optimizer)
        if isinstance(bound, dict):
            _check_module_bounds(module, bound)
        steps = len(data_loader)
        if steps == 0:
            raise ValueError("regops: data_loader yields no batch")
        sample_rate = 1 / steps
        # Opacus's int(len(dataset) * sample_rate), without its float rounding (49 * (1 / 49) < 1)
        expected_batch_size = len(data_loader.dataset) // steps
        if expected_batch_size == 0:
            raise ValueError(
                f"regops: data_loader has more batches ({steps}) than examples ({len(data_loader.dataset)}): the "
                "expected batch size would be 0"
            )
        self._note_dataset(data_loader.dataset)
        distributed = isinstance(module, nn.parallel.DistributedDataParallel) or is_fsdp(module)
        world = torch.distributed.get_world_size() if distributed else 1

        if poisson_sampling:
            gen = data_loader.generator if data_loader.generator is not None else _new_generator("cpu")
            if distributed:
                _agree_across_ranks(gen)
            data_loader = DPDataLoader.from_data_loader(
                data_loader, generator=gen, distributed=distributed, batch_first=batch_first
            )
            self.sample_generator = gen
        else:
            self.sample_generator = None
        self.noise_generator = noise_generator if noise_generator is not None else _new_generator(trainable[0].device)

        config = StepConfig(
            max_grad_norm=bound,
            noise_multiplier=sigma,
            loss_reduction=loss_reduction,
            expected_batch_size=expected_batch_size,
            per_layer=per_layer,
            generator=self.noise_generator,
            batch_dim=0 if batch_first else 1,
            poisson=bool(poisson_sampling),
            world=world,
            forms=forms,
            unsupported=unsupported,
        )

        def on_step(accumulated: int) -> None:
            self._record_step(config.noise_multiplier, sample_rate * accumulated)

        step = DPStep(module, config, on_step)
        return PrivateModule(module, step), DPOptimizer(optimizer, step), data_loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | Mapping[str, float],
        **kwargs: Any,
    ) -> tuple[PrivateModule, DPOptimizer, DataLoader]:
        """`make_private` with the smallest noise multiplier that keeps ``epochs`` passes over
        ``data_loader`` (``int(epochs * len(data_loader))`` steps at rate ``1 / len(data_loader)``) within
        ``(target_epsilon, target_delta)``, by Opacus's search (``get_noise_multiplier``: epsilon within 0.01
        below the target). Other arguments as `make_private`."""
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
            raise ValueError(f"regops: epochs must be > 0, got {epochs!r}")
        if not isinstance(data_loader, DataLoader) or len(data_loader) == 0:
            raise ValueError("regops: data_loader must be a DataLoader that yields batches")
        if self.history:
            warnings.warn(
                "regops: make_private_with_epsilon after steps were already taken: the noise multiplier is chosen "
                "for a fresh budget, so the total privacy spent will exceed the target",
                stacklevel=2,
            )
        sample_rate = 1 / len(data_loader)
        sigma = noise_multiplier_for(
            target_epsilon, sample_rate, int(epochs / sample_rate), target_delta, accountant=self.accountant_name
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    # -- accounting
    @property
    def accountant(self) -> PrivacyAccountant:
        """Opacus's accountant (`regops.PrivacyAccountant`) fed with `history` (its steps with noise)."""
        if self._accountant is None:
            accountant = PrivacyAccountant(self.accountant_name)
            for sigma, q, n in self.history:
                if sigma > 0:
                    accountant.step(noise_multiplier=sigma, sample_rate=q, steps=n)
            self._accountant = accountant
        return self._accountant

    def _record_step(self, noise_multiplier: float, sample_rate: float) -> None:
        if self._accountant is not None and noise_multiplier > 0:
            self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def get_epsilon(self, delta: float) -> float:
        """The ``epsilon`` of ``(epsilon, delta)``-DP spent by the steps taken so far (Opacus's accountant on the
        same history; ``inf`` after a step without noise, ``0`` before any step)."""
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"regops: delta must be in (0, 1), got {delta!r}")
        if not self.history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self.history):
            return math.inf
        return self.accountant.epsilon(delta)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        """The accountant's history and the sampling and noise generators' states: save it with the checkpoint
        (under DDP rank 0's is enough: the sampling generator is the same on every rank and the noise is drawn
        on rank 0)."""
        return {
            "accountant": self.accountant_name,
            "history": list(self.history),
            "sample_generator": None if self.sample_generator is None else self.sample_generator.get_state(),
            "noise_generator": None if self.noise_generator is None else self.noise_generator.get_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore `state_dict` (after `make_private`, whose generators it sets): training then
        continues as it would have, bit for bit."""
        if state_dict.get("accountant") != self.accountant_name:
            raise ValueError(
                f"regops: the state is of a {state_dict.get('accountant')!r} accountant, this engine's is "
                f"{self.accountant_name!r}"
            )
        history = [(float(s), float(q), int(n)) for s, q, n in state_dict["history"]]
        generators = {"sample_generator": self.sample_generator, "noise_generator": self.noise_generator}
        for key, gen in generators.items():
            value = state_dict.get(key)
            if value is not None and gen is None:
                raise RuntimeError(f"regops: call make_private before load_state_dict: the state holds a {key}")
        for key, gen in generators.items():
            if state_dict.get(key) is not None:
                gen.set_state(state_dict[key])
        self.history, self._accountant = history, None

    def save_checkpoint(
        self,
        *,
        path: str | os.PathLike | IO[bytes],
        module: nn.Module,
        optimizer: Optimizer | None = None,
        checkpoint_dict: dict[str, Any] | None = None,
    ) -> None:
        """``torch.save`` of the module's and optimizer's state dicts and the engine's `state_dict`."""
        checkpoint = dict(checkpoint_dict or {})
        checkpoint["module_state_dict"] = module.state_dict()
        checkpoint["privacy_engine_state_dict"] = self.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
        torch.save(checkpoint, path)

    def load_checkpoint(
        self, *, path: str | os.PathLike | IO[bytes], module: nn.Module, optimizer: Optimizer | None = None
    ) -> dict[str, Any]:
        """Restore what `save_checkpoint` saved (call `make_private` first); returns the checkpoint."""
        checkpoint = torch.load(path, weights_only=True)
        module.load_state_dict(checkpoint["module_state_dict"])
        self.load_state_dict(checkpoint["privacy_engine_state_dict"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        return checkpoint

    def _note_dataset(self, dataset: Any) -> None:
        if self.dataset is not None and self.dataset is not dataset:
            warnings.warn(
                "regops: this PrivacyEngine already accounts for another dataset; privacy is accounted per dataset: "
                "use a new PrivacyEngine for a different one",
                stacklevel=3,
            )
        self.dataset = dataset


def _new_generator(device: torch.device | str) -> torch.Generator:
    """A generator of its own (reproducible under ``torch.manual_seed``; saved with the engine's state)."""
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    return torch.Generator(device=device).manual_seed(seed)


def _agree_across_ranks(gen: torch.Generator) -> None:
    """Give every rank rank 0's sampling state: the ranks' shards then split one Poisson draw (each example joins
    each batch independently), and rank 0's checkpoint restores every rank."""
    state = [gen.get_state()]
    torch.distributed.broadcast_object_list(state, src=0)
    gen.set_state(state[0])


def _check_optimizer_params(module: nn.Module, optimizer: Optimizer) -> None:
    owned = {id(p) for p in module.parameters()}
    if any(id(p) not in owned for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("regops: the optimizer holds parameters that are not the module's")


def _check_module_bounds(module: nn.Module, bounds: dict[str, float]) -> None:
    owner: dict[int, str] = {}  # a tied parameter belongs to the first module holding it, as in the recorder
    for name, m in module.named_modules():
        for p in m._parameters.values():
            if p is not None and p.requires_grad:
                owner.setdefault(id(p), name)
    holders = set(owner.values())
    if set(bounds) != holders:
        raise ValueError(
            f"regops: per-layer max_grad_norm needs one bound per module holding trainable parameters {sorted(holders)}"
            f"; unknown: {sorted(set(bounds) - holders)}, missing: {sorted(holders - set(bounds))}"
        )
