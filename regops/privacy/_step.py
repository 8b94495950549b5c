"""The DP step that the user's unchanged loop drives: the wrapped model opens a :func:`regops.dp_clipping` block at
the first training forward of a step, and the wrapped optimizer closes it (clipped sum + noise, divided by the
expected batch size) before the inner optimizer's step. Between the two, the user's loss and ``backward()`` run
inside the block exactly as in the explicit loop::

    with regops.dp_clipping(model, ...):     # opened by PrivateModule.forward
        loss = criterion(model(x), y)
        loss.backward()
    opt.step()                               # DPOptimizer.step closes the block first
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils import _pytree as pytree

from regops.grad_norms import DPClipping, dp_clipping


@dataclass
class StepConfig:
    """What every step's ``dp_clipping`` block is made with (the optimizer's setters change it between steps)."""

    max_grad_norm: float | Mapping[str, float]
    noise_multiplier: float
    loss_reduction: str
    expected_batch_size: int
    per_layer: bool
    generator: torch.Generator | None
    batch_dim: int
    poisson: bool
    world: int  # ranks whose clipped sums dp_clipping averages (DDP, FSDP2); 1 otherwise
    forms: str | Mapping[str, str] | None = None
    unsupported: str = "error"


def is_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` is under FSDP2's ``fully_shard`` (no import: an unimported FSDP cannot have built it)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def batch_size_of(args: tuple, kwargs: dict, batch_dim: int) -> int | None:
    """The batch size of a forward's inputs: the size in ``batch_dim`` of the first tensor that has that dim."""
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > batch_dim:
            return leaf.shape[batch_dim]
    return None


class DPStep:
    """The state shared by :class:`PrivateModule` and :class:`DPOptimizer`: the open block of the current step,
    the forwards it has seen, and what the step reports to the accountant (``on_step(k)``, ``k`` the forwards
    accumulated since the last ``zero_grad``, Opacus's ``accumulated_iterations``)."""

    def __init__(self, module: nn.Module, config: StepConfig, on_step: Callable[[int], None]) -> None:
        self.module = module
        self.config = config
        self.on_step = on_step
        self.block: DPClipping | None = None
        self.forwards = 0  # training forwards since the last zero_grad (or step)
        self.step_forwards = 0  # training forwards since the last step
        self.step_examples = False  # whether one of them had examples

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def before_forward(self, empty: bool) -> None:
        """Called by the model's training forward, before the module runs."""
        cfg = self.config
        if cfg.poisson and self.forwards >= 1:
            self.discard()  # the step is broken: leave no block (and its TorchFunctionMode) active
            raise ValueError(
                "regops: Poisson sampling takes one batch per DP step, but the model ran a second training forward "
                "without optimizer.step() or optimizer.zero_grad() in between. Call optimizer.step() after every "
                "backward, or split large batches with regops.privacy.BatchMemoryManager (optimizer.signal_skip_step)"
            )
        if empty and self.step_examples:
            self.discard()
            raise ValueError(
                "regops: an empty batch inside a DP step that already ran examples (accumulated forwards); an "
                "empty batch must be a step of its own: it takes the noise-only step"
            )
        if self.block is None:
            self._open()
        self.step_examples = self.step_examples or not empty
        self.forwards += 1
        self.step_forwards += 1

    def _open(self) -> None:
        cfg = self.config
        # The step's gradient replaces p.grad (Opacus's DPOptimizer overwrites it too): the block keeps what p.grad
        # held before it, so start from nothing.
        for p in self._trainable():
            p.grad = None
        block = dp_clipping(
            self.module,
            cfg.max_grad_norm,
            loss_reduction=cfg.loss_reduction,
            noise_multiplier=cfg.noise_multiplier,
            generator=cfg.generator,
            per_layer=cfg.per_layer,
            expected_batch_size=cfg.expected_batch_size,
            forms=cfg.forms,
            unsupported=cfg.unsupported,
            batch_dim=cfg.batch_dim,
        )
        block.__enter__()
        self.block = block

    def finish(self) -> None:
        """Close the step's block: every trainable ``p.grad`` becomes the clipped, noised sum over the step's
        examples divided by the expected batch size (noise only after an empty batch), then report the step."""
        if self.block is None and self.step_forwards == 0:
            raise RuntimeError(
                "regops: optimizer.step() with no forward pass of the private model since the last step; run the "
                "model on the batch (an empty Poisson batch too: its step adds only the noise) before stepping"
            )
        if self.block is None:
            self._open()
        block, self.block = self.block, None
        k = max(self.forwards, 1)
        self.forwards = 0
        self.step_forwards = 0
        self.step_examples = False
        block.__exit__(None, None, None)
        world = self.config.world
        if world != 1 or k != 1:
            # dp_clipping averages the ranks' clipped sums (each divided by the global expected batch size): the
            # global sum is world times that. Opacus divides by the expected batch size times the forwards
            # accumulated since zero_grad.
            for p in self._trainable():
                if p.grad is not None:
                    if world != 1:
                        p.grad.mul_(world)
                    if k != 1:
                        p.grad.div_(k)
        self.on_step(k)

    def discard(self) -> None:
        """Drop the open block's recording (``zero_grad`` before ``step``, a failed forward): hooks removed, ``p.grad``
        cleared."""
        self.forwards = 0
        self.step_forwards = 0
        self.step_examples = False
        if self.block is not None:
            block, self.block = self.block, None
            reason = RuntimeError("regops: the step was discarded")
            block.__exit__(RuntimeError, reason, None)


class PrivateModule(nn.Module):
    """The model returned by `regops.PrivacyEngine.make_private`: the user's module (``._module``) whose
    training forwards open the step's `regops.dp_clipping` block (the role of Opacus's
    ``GradSampleModule``). Evaluation (``model.eval()`` or ``torch.no_grad()``) runs the module as it is.

    An empty batch (0 examples in the batch dim) runs in the block unrecorded: the step adds only the noise
    (under FSDP2 every rank runs the same forward and backward collectives). Under ``DistributedDataParallel``
    each training forward runs under ``no_sync()``: DDP's own gradient all-reduce is wasted work here (the clipped
    sums are averaged once per step), and without it the ranks may run different numbers of physical batches per
    step (an empty local batch, virtual steps).

    Args:
        module: the user's model.
        step: the DP step the engine set up (``make_private`` builds both).

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> dataset = torch.utils.data.TensorDataset(torch.randn(256, 20), torch.randint(0, 5, (256,)))
        >>> train_loader = torch.utils.data.DataLoader(dataset, batch_size=64)
        >>> privacy_engine = regops.PrivacyEngine()
        >>> model, optimizer, train_loader = privacy_engine.make_private(
        ...     module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.1, max_grad_norm=1.0)
        >>> isinstance(model, regops.privacy.PrivateModule), type(model._module).__name__
        (True, 'Sequential')
    """

    def __init__(self, module: nn.Module, step: DPStep) -> None:
        super().__init__()
        self._module = module
        self._dp_step = step
        self.train(module.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self._module
        if not (self.training and torch.is_grad_enabled()):
            return module(*args, **kwargs)
        step = self._dp_step
        step.before_forward(batch_size_of(args, kwargs, step.config.batch_dim) == 0)
        try:
            if isinstance(module, nn.parallel.DistributedDataParallel):
                with module.no_sync():
                    return module(*args, **kwargs)
            return module(*args, **kwargs)
        except BaseException:
            step.discard()  # a failed forward (a BatchNorm in train mode, ...) leaves no recording active
            raise

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__["_modules"].get("_module")
            if inner is None:
                raise
            return getattr(inner, name)


class DPOptimizer(Optimizer):
    """The optimizer returned by `regops.PrivacyEngine.make_private`: ``step()`` closes the DP step (clipped
    sum of per-example gradients + Gaussian noise from the noise generator, divided by ``expected_batch_size``),
    reports it to the engine's accountant, then runs the wrapped optimizer's step (``original_optimizer``).

    Virtual steps (Opacus's ``signal_skip_step``): after ``signal_skip_step(True)`` the next ``step()`` only lets
    the block keep accumulating (no noise, no update, no accounting) and the next ``zero_grad()`` keeps it;
    noise is added once, at the first step not signalled. `regops.privacy.BatchMemoryManager` does the
    signalling. ``zero_grad()`` at any other time between a forward and ``step()`` discards the step.

    ``param_groups``, ``state``, ``defaults``, ``state_dict`` and ``load_state_dict`` are the wrapped
    optimizer's (learning-rate schedulers work as usual). ``noise_multiplier`` and ``max_grad_norm`` can be
    changed between steps (noise schedules).

    Args:
        optimizer: the user's optimizer.
        step: the DP step the engine set up (``make_private`` builds both).

    Example::

        >>> F = torch.nn.functional
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> dataset = torch.utils.data.TensorDataset(torch.randn(256, 20), torch.randint(0, 5, (256,)))
        >>> train_loader = torch.utils.data.DataLoader(dataset, batch_size=64)
        >>> privacy_engine = regops.PrivacyEngine()
        >>> model, optimizer, train_loader = privacy_engine.make_private(
        ...     module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.1, max_grad_norm=1.0)
        >>> isinstance(optimizer, regops.privacy.DPOptimizer), type(optimizer.original_optimizer).__name__
        (True, 'SGD')
        >>> optimizer.noise_multiplier = 0.9  # a noise schedule
    """

    # GradScaler then hands its scale to step() (``grad_scale``) instead of unscaling p.grad behind our back.
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: Optimizer, step: DPStep) -> None:
        # Optimizer.__init__ is not called: parameters, state and hyper-parameters stay the wrapped optimizer's.
        self.original_optimizer = optimizer
        self._dp_step = step
        self._step_skip_queue: list[bool] = []
        self._is_last_step_skipped = False

    # -- the wrapped optimizer's state
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        return self.original_optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.original_optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.original_optimizer.defaults = defaults

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.original_optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"

    # -- DP settings
    @property
    def noise_multiplier(self) -> float:
        return self._dp_step.config.noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        self._dp_step.config.noise_multiplier = check_noise_multiplier(value)

    @property
    def max_grad_norm(self) -> float | Mapping[str, float]:
        return self._dp_step.config.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | Mapping[str, float]) -> None:
        self._dp_step.config.max_grad_norm = check_max_grad_norm(value, self._dp_step.config.per_layer)

    @property
    def expected_batch_size(self) -> int:
        return self._dp_step.config.expected_batch_size

    @property
    def loss_reduction(self) -> str:
        return self._dp_step.config.loss_reduction

    # -- the step
    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Queue whether the next ``step()`` only accumulates (``True``: a physical batch that is not the last of
        its logical batch) or takes the DP step (``False``)."""
        self._step_skip_queue.append(bool(do_skip))

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self._is_last_step_skipped:
            self._dp_step.discard()
        else:
            self._dp_step.forwards = 0
        self.original_optimizer.zero_grad(set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        if getattr(self, "grad_scale", None) is not None:
            self._dp_step.discard()
            raise NotImplementedError(
                "regops: a DP step cannot take a GradScaler: the loss scale would scale every per-example gradient "
                "before clipping. Train under torch.autocast with bfloat16 (no loss scaling needed)"
            )
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self._step_skip_queue and self._step_skip_queue.pop(0):
            self._is_last_step_skipped = True
            return None
        self._is_last_step_skipped = False
        self._dp_step.finish()
        return self.original_optimizer.step()


def check_noise_multiplier(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"regops: noise_multiplier must be a number >= 0, got {value!r}")
    return float(value)


def check_max_grad_norm(value: Any, per_layer: bool) -> float | dict[str, float]:
    if isinstance(value, Mapping):
        if not per_layer:
            raise ValueError("regops: a {module name: bound} max_grad_norm needs clipping='per_layer'")
        bounds = dict(value)
    elif isinstance(value, (list, tuple)):
        raise ValueError(
            "regops: max_grad_norm as a list (Opacus's one bound per parameter) is not supported: regops clips "
            "per module; pass a float, or {module name: bound} with clipping='per_layer'"
        )
    else:
        bounds = {"": value}
    for c in bounds.values():
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise ValueError(f"regops: max_grad_norm must be > 0, got {value!r}")
    return dict(value) if isinstance(value, Mapping) else float(value)
