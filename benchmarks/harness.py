"""One harness for every benchmark case.

A case file ``<family>.py`` registers cases with :func:`case`. A case's ``make(device, quick)`` returns a
:class:`Setup`: the variants to time (``"regops"``, ``"eager"``, ``"compile"``, peers such as ``"timm"``), the
minimal bytes one call must move (and flops where that matters), and optionally forward-only callables whose
bytes saved for backward are measured. The harness reports per variant: median and minimum time over the stated
number of rounds, GB/s, % of a same-run device-to-device copy, speedup over eager and over torch.compile, bytes
saved for backward and peak memory; it writes JSON (with the device, versions, command and date), CSV and a PNG
plot under ``benchmarks/results/<device>/``.

A crash in a measured variant stops the run (it is a bug, never a missing row). Only a peer library may be
absent or refuse a case: :class:`PeerMissing` / :class:`PeerRefused` (or ``Setup.skipped``) record the variant
with the reason, and the case still runs.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import importlib.abc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import types
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Setup:
    """What one case measures on one device."""

    variants: dict[str, Callable[[], Any]]
    bytes: int
    flops: int | None = None
    # Forward-only callables (inputs require grad) whose saved-for-backward bytes are reported.
    forward: dict[str, Callable[[], Any]] = field(default_factory=dict)
    note: str = ""
    # Variants that cannot run on this device, with the reason (a peer whose kernels need a GPU, ...): reported as
    # rows that say so instead of vanishing from the table.
    skipped: dict[str, str] = field(default_factory=dict)
    # Calls each variant makes per timed run (host-overhead cases loop over tiny calls): times are per call.
    calls: int = 1
    # "wall" (default), or "thread": the calling thread's CPU time, what host overhead is made of; unlike wall time
    # it does not count the time other processes hold the core.
    clock: str = "wall"


@dataclass
class Case:
    family: str
    name: str
    params: str
    make: Callable[[torch.device, bool], Setup | None]
    devices: tuple[str, ...] = ("cpu", "cuda")


CASES: list[Case] = []


def case(family: str, name: str, params: str = "", devices: tuple[str, ...] = ("cpu", "cuda")):
    """Register ``make(device, quick) -> Setup | None`` (None: not applicable on this device)."""

    def register(make):
        CASES.append(Case(family, name, params, make, devices))
        return make

    return register


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile with settings shared by every case (dynamic shapes off: one shape per case)."""
    return torch.compile(fn, dynamic=False)


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``rounds`` timed calls after warm-up."""

    median: float
    min: float
    rounds: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        return cls(statistics.median(seconds), min(seconds), len(seconds))


def time_fn(fn: Callable[[], Any], device: torch.device, *, quick: bool = False, clock: str = "wall") -> Timing:
    """Median and minimum seconds per call after warm-up (CUDA events on GPU, perf_counter on CPU; with
    ``clock="thread"`` the calling thread's CPU time on any device): at least 3 rounds, then as many as fit in the
    time budget (at most 200)."""
    warmup = 2 if quick else 5
    for _ in range(warmup):
        fn()
    _sync(device)
    budget = 0.2 if quick else 1.0
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start_all < budget and len(times) < 200):
        if clock == "thread":
            t0 = time.thread_time()
            fn()
            times.append(time.thread_time() - t0)
        elif device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing.of(times)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each call of ``fns``, ``rounds`` times, the callables interleaved within each round (paired
    comparisons on a shared machine: a slow spell hits every variant). No warm-up: the caller's first calls are."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured now."""
    numel = (1 << 26) if device.type == "cuda" else (1 << 24)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, quick=quick).median
    return 2 * src.numel() * src.element_size() / seconds


# ------------------------------------------------------------------------------------------------ memory
def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of distinct tensor storage autograd saves for backward while ``fn`` runs."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel():
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        else:
            seen[(id(t), -1)] = 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated above the starting point while ``fn`` runs."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _cpu_peak(fn)


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence what native code writes to fds 1 and 2 (the profiler's ``USDT ... profiler_start`` and
    ``gpuGetDeviceCount failed`` lines): they are noise in the benchmark output, not results."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _cpu_peak(fn: Callable[[], Any]) -> int:
    """CPU allocator peak from the profiler's allocation events (torch has no CPU allocator counters)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    return peak


# ------------------------------------------------------------------------------------------------ running
def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _git_revision() -> str | None:
    from regops._core import toolkit

    return toolkit.git_revision(str(RESULTS_DIR.parents[1]))


def _command() -> list[str]:
    """This process's command line, a benchmark script written as the ``python -m benchmarks.<name>`` that ran it."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.parent == RESULTS_DIR.parent and script.suffix == ".py":
        module = "benchmarks" if script.stem == "__main__" else f"benchmarks.{script.stem}"
        return ["python", "-m", module, *sys.argv[1:]]
    return ["python", *sys.argv]


def environment(device: torch.device, command: list[str] | None = None) -> dict[str, Any]:
    """Where and how a result was measured: device, versions, threads, the command line and the date."""
    import importlib.metadata

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "regops": version("regops"),
        "git": _git_revision(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(command if command is not None else _command()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ------------------------------------------------------------------------------------------------ missing peers
class PeerMissing(RuntimeError):
    """A peer library a variant needs is not installed: that variant is skipped, the case still runs."""


class PeerRefused(RuntimeError):
    """A peer library cannot run this case here (it rejects the model, or its kernels need a GPU): the variant is
    reported with the peer's reason, the case still runs."""


def peer(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` (a call into the peer library ``name``) with any error it raises turned into :class:`PeerRefused`:
    for peer baselines only, never for regops' own variants (their errors must stop the run)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PeerMissing:
            raise
        except Exception as exc:  # the peer's own refusal, reported with its message
            raise PeerRefused(f"{name}: {type(exc).__name__}: {exc}") from exc

    return run


class _MissingModule(types.ModuleType):
    """Stands in for a peer that is not installed: every attribute is a callable that raises PeerMissing, so a
    case that imports the peer while it is built still builds, and only the peer's variant fails when run."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__path__: list[str] = []  # a package: its submodules import as stubs too

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        root = self.__name__.split(".")[0]

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise PeerMissing(f"peer {root!r} is not installed")

        return missing


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name.split(".")[0] in self.roots else None

    def create_module(self, spec):
        return _MissingModule(spec.name)

    def exec_module(self, module) -> None:
        pass


# Never stubbed: a missing one of these is a broken install, not a missing baseline.
_NOT_PEERS = {"torch", "regops", "benchmarks", "triton", "numpy"}


def build_case(c: Case, device: torch.device, quick: bool) -> tuple[Setup | None, set[str]]:
    """``c.make(device, quick)`` with every missing peer library replaced by a stub (see :class:`_MissingModule`);
    returns the setup and the names of the peers that are missing."""
    missing: set[str] = set()
    while True:
        finder = _StubFinder(missing)
        sys.meta_path.append(finder)  # last: only modules no real finder provides
        try:
            return c.make(device, quick), missing
        except ModuleNotFoundError as exc:
            root = (exc.name or "").split(".")[0]
            if not root or root in missing or root in _NOT_PEERS:
                raise
            missing.add(root)
        finally:
            sys.meta_path.remove(finder)
            for name in [n for n in sys.modules if n.split(".")[0] in missing]:
                if isinstance(sys.modules[name], _MissingModule):
                    del sys.modules[name]


def run_case(c: Case, device: torch.device, copy_bps: float, quick: bool) -> list[dict[str, Any]]:
    """Time every variant of ``c``. An error in a case or a variant propagates (the run fails), except a peer
    that is missing or refuses (:class:`PeerMissing`, :class:`PeerRefused`, ``Setup.skipped``): its row says
    why."""
    setup, _ = build_case(c, device, quick)
    if setup is None:
        return []
    rows = []
    for variant, reason in setup.skipped.items():
        rows.append(
            {"family": c.family, "case": c.name, "params": c.params, "variant": variant, "error": f"skipped: {reason}"}
        )
    for variant, fn in setup.variants.items():
        row: dict[str, Any] = {"family": c.family, "case": c.name, "params": c.params, "variant": variant}
        try:
            timing = time_fn(fn, device, quick=quick, clock=setup.clock)
        except (PeerMissing, PeerRefused) as exc:
            row.update(error=f"skipped: {exc}"[:300])
            rows.append(row)
            continue
        seconds = timing.median / setup.calls
        row["ms"] = seconds * 1e3
        row["ms_min"] = timing.min / setup.calls * 1e3
        row["rounds"] = timing.rounds
        row["GB/s"] = setup.bytes / seconds / 1e9
        row["%copy"] = 100.0 * setup.bytes / seconds / copy_bps
        if setup.flops:
            row["GFLOP/s"] = setup.flops / seconds / 1e9
        row["peak_MB"] = _mb(peak_memory(fn, device))
        if variant in setup.forward:
            row["saved_MB"] = _mb(saved_bytes(setup.forward[variant]))
        row["note"] = setup.note
        rows.append(row)
    for row in rows:
        for base in ("eager", "compile"):
            ref = next((r for r in rows if r["variant"] == base and "ms" in r), None)
            if ref is not None and "ms" in row:
                row[f"x_{base}"] = ref["ms"] / row["ms"]
    del setup
    gc.collect()
    return rows


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def run(
    families: list[str] | None = None,
    device: torch.device | None = None,
    quick: bool = False,
    match: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from tqdm import tqdm

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [
        c
        for c in CASES
        if device.type in c.devices
        and (not families or c.family in families)
        and (not match or re.search(match, f"{c.family} {c.name} {c.params}"))
    ]
    env = environment(device)
    env["copy_GB/s"] = copy_bandwidth(device, quick) / 1e9
    rows: list[dict[str, Any]] = []
    for c in tqdm(cases, desc=f"benchmarks on {device.type}", unit="case"):
        rows.extend(run_case(c, device, env["copy_GB/s"] * 1e9, quick))
    return env, rows


# ------------------------------------------------------------------------------------------------ output
COLUMNS = [
    "family", "case", "params", "variant", "ms", "ms_min", "rounds", "GB/s", "%copy", "x_eager", "x_compile",
    "saved_MB", "peak_MB",
]  # fmt: skip


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = (
        f"device: {env['device']} ({env['device_type']}), torch {env['torch']}, triton {env['triton']}, "
        f"copy {env['copy_GB/s']:.1f} GB/s"
    )
    if env["device_type"] == "cpu":
        head += (
            "\nno GPU: CPU paths (regops runs its C++ CPU kernels where regops._C has them, else its reference;"
            " Triton/CUDA kernels need a GPU)"
        )
    cells = [[_fmt(r.get(c)) if "error" not in r or c in COLUMNS[:4] else "" for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(COLUMNS)]
    line = "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))
    body = []
    for r, row in zip(rows, cells, strict=True):
        if "error" in r:  # the reason, after the case's columns
            body.append("  ".join(v.ljust(w) for v, w in zip(row[:4], widths, strict=True)) + "  " + r["error"])
        else:
            body.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    return "\n".join([head, line, "-" * len(line), *body])


def write(env: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path | None = None, stem: str = "results") -> Path:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.png``; returns the path of the JSON file."""
    out_dir = out_dir or RESULTS_DIR / device_slug(torch.device(env["device_type"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (COLUMNS + [k]).index(k))
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    plot(env, rows, out_dir / f"{stem}.png")
    return path


def record(path: Path, run: dict[str, Any]) -> Path:
    """Append ``run`` (a dict with its ``environment`` and results) to the result file ``path``: every run is kept,
    so a figure quoted from one run can be read beside the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    if path.exists():
        data = json.loads(path.read_text())
        runs = data["runs"] if "runs" in data else [data]  # a file written before runs were kept: its one run
    runs.append(run)
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    return path


def result_path(name: str, device: torch.device | None = None) -> Path:
    """``benchmarks/results/<device>/<name>.json``."""
    return RESULTS_DIR / device_slug(device or torch.device("cpu")) / f"{name}.json"


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["family"], row["case"], row["params"]


def _baseline(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row a case's speedups are measured against: eager PyTorch, else the first peer."""
    timed = [r for r in rows if "ms" in r]
    return next((r for r in timed if r["variant"] == "eager"), None) or next(
        (r for r in timed if not r["variant"].startswith("regops")), None
    )


def plot(env: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    """Speedup of every variant over the case's baseline (eager, else the peer), one panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    panels = []
    for family in families:
        cases = list(dict.fromkeys(_key(r) for r in rows if r["family"] == family))
        bars = []
        for key in cases:
            case_rows = [r for r in rows if _key(r) == key]
            base = _baseline(case_rows)
            if base is None:
                continue
            label = f"{key[1]} ({key[2]})\nvs {base['variant']}"
            bars.append((label, [(r["variant"], base["ms"] / r["ms"]) for r in case_rows if "ms" in r]))
        if bars:
            panels.append((family, bars))
    if not panels:
        return
    heights = [sum(len(v) for _, v in bars) + len(bars) for _, bars in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, 0.16 * sum(heights) + 1.2 * len(panels)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (family, bars) in zip(axes[:, 0], panels, strict=True):
        y, ticks, labels = 0.0, [], []
        for label, values in bars:
            start = y
            for variant, speedup in values:
                peer_color = colors[1 + zlib.crc32(variant.encode()) % (len(colors) - 1)]
                color = colors[0] if variant.startswith("regops") else peer_color
                ax.barh(y, speedup, color=color, height=0.8)
                ax.text(speedup, y, f" {variant} {speedup:.2g}x", va="center", fontsize=6)
                y += 1
            ticks.append((start + y - 1) / 2)
            labels.append(label)
            y += 1
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(family, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("speedup over the baseline (higher is better; regops in the first colour)")
    fig.suptitle(f"regops on {env['device']} ({env['device_type']}), torch {env['torch']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)
