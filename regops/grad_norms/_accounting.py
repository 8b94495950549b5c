"""Privacy accounting for DP-SGD through Opacus's accountants (an optional dependency: ``pip install opacus``,
in regops' ``peers`` extra). regops does not reimplement the analysis: the field's audited code does it."""

from __future__ import annotations

from typing import Any

ACCOUNTANTS = ("rdp", "prv", "gdp")


def _opacus_accountant(name: str) -> Any:
    if name not in ACCOUNTANTS:
        raise ValueError(f"regops: accountant must be one of {ACCOUNTANTS}, got {name!r}")
    try:
        from opacus.accountants import create_accountant
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "regops: privacy accounting uses Opacus's accountants; install it with `pip install opacus` "
            "(or `pip install regops[peers]`)"
        ) from e
    return create_accountant(name)


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if isinstance(noise_multiplier, bool) or not noise_multiplier > 0:
        raise ValueError(f"regops: noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"regops: sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"regops: steps must be an int >= 0, got {steps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"regops: delta must be in (0, 1), got {delta!r}")


class PrivacyAccountant:
    """Tracks the privacy spent by DP-SGD steps (Poisson sampling with rate ``q``, Gaussian noise ``sigma``).

    A thin wrapper over Opacus's accountant (``"rdp"``: Renyi DP, ``"prv"``: privacy random variables,
    ``"gdp"``: Gaussian DP). Call `step` once per optimizer step.

    Args:
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.

    Example::

        >>> acc = regops.PrivacyAccountant("rdp")
        >>> for step in range(1000):  # each: one dp_clipping block + opt.step()
        ...     acc.step(noise_multiplier=1.1, sample_rate=256 / 60000)
        >>> 0 < acc.epsilon(delta=1e-5) < 1
        True
    """

    def __init__(self, accountant: str = "rdp") -> None:
        self.name = accountant
        self._acc = _opacus_accountant(accountant)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        _check(noise_multiplier, sample_rate, steps, 0.5)
        for _ in range(steps):
            self._acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        if not 0 < delta < 1:
            raise ValueError(f"regops: delta must be in (0, 1), got {delta!r}")
        if len(self._acc) == 0:
            return 0.0
        return float(self._acc.get_epsilon(delta=delta))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._acc.history)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """The ``epsilon`` of ``(epsilon, delta)``-DP after ``steps`` DP-SGD steps with noise multiplier
    ``sigma`` and Poisson sampling rate ``q`` (expected batch size / dataset size), by Opacus's accountant.

    Example::

        >>> regops.grad_norms.epsilon(noise_multiplier=1.1, sample_rate=256 / 60000, steps=14060, delta=1e-5)
    """
    _check(noise_multiplier, sample_rate, steps, delta)
    acc = _opacus_accountant(accountant)
    if steps == 0:
        return 0.0
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def noise_multiplier_for(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier ``sigma`` for which ``steps`` steps at rate ``q`` stay within
    ``(target_epsilon, delta)`` (Opacus's ``get_noise_multiplier``)."""
    _check(1.0, sample_rate, steps, delta)
    if not target_epsilon > 0:
        raise ValueError(f"regops: target_epsilon must be > 0, got {target_epsilon!r}")
    _opacus_accountant(accountant)
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )
