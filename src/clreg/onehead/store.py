"""Units of work and where they are kept: typed unit state, atomic saving, resuming and seeding.

Every unit (stage 1, a single-task baseline, the joint reference, one stage of one method) ends in a
:class:`UnitState`, written atomically to ``<out>/state/seed<k>/<unit>.pt`` (it loads with
``torch.load(weights_only=True)``). A run killed at any point resumes after the last finished unit,
and a finished unit is never repeated. Every unit seeds torch's global generator from (seed, unit)
before it starts, so a resumed run gives the numbers of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import stable_seed
from ..distributed import rank_and_world
from .metrics import Metric, interval, resample_counts

__all__ = [
    "UNIT_FORMAT",
    "EvalRecord",
    "UnitState",
    "UnitStore",
    "atomic_save",
    "evaluation_record",
    "peak_rss_sampler",
]

UNIT_FORMAT = 2  # the layout of a saved unit; a folder of another layout is refused on resume

_RECORD_KEYS = ("value", "lo", "hi", "n", "boot")


@dataclass
class EvalRecord:
    """A metric's value, its 95 % bootstrap interval, the resampled scores and the task's extras."""

    value: float
    lo: float
    hi: float
    n: int
    boot: Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "n": self.n, "boot": self.boot, **self.extras}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> EvalRecord:
        return cls(*(r[k] for k in _RECORD_KEYS), {k: v for k, v in r.items() if k not in _RECORD_KEYS})


def evaluation_record(metric: Metric, resamples: int, extras: dict[str, Any] | None = None) -> EvalRecord:
    """A metric's record: the bootstrap resamples are seeded by the number of images, so every record
    of a task uses the same resamples and can be paired."""
    boot = metric.scores(resample_counts(metric.n, resamples, seed=metric.n)).double()
    lo, hi = interval(boot)
    return EvalRecord(float(metric.value()), lo, hi, int(metric.n), boot, dict(extras or {}))


@dataclass
class UnitState:
    """What a unit leaves: evaluations, training figures and, where later units start from it, the
    model, optimizer, regularizer, replay buffer and first-stage path trackers."""

    evals: dict[str, EvalRecord]
    train: dict[str, Any] = field(default_factory=dict)  # steps, seconds, loss (, consolidate_seconds)
    model: dict[str, Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    reg: dict[str, Any] | None = None
    buffer: dict[str, Any] | None = None
    trackers: dict[str, dict[str, Any]] = field(default_factory=dict)
    regularizer_bytes: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    rng: Tensor | None = None

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": UNIT_FORMAT, "evals": {k: r.to_record() for k, r in self.evals.items()}}
        for key in ("train", "model", "optimizer", "reg", "buffer", "trackers"):
            value = getattr(self, key)
            if value:
                out[key] = value
        out |= {"regularizer_bytes": self.regularizer_bytes, "seconds": self.seconds, "peak_rss": self.peak_rss}
        if self.rng is not None:
            out["rng"] = self.rng
        return out

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> UnitState:
        if r.get("format") != UNIT_FORMAT:
            raise ValueError(f"unit layout {r.get('format', 1)}, this clreg reads {UNIT_FORMAT}")
        evals = {k: EvalRecord.from_record(v) for k, v in r["evals"].items()}
        keys = ("train", "model", "optimizer", "reg", "buffer", "trackers", "regularizer_bytes", "seconds")
        return cls(evals, **{k: r[k] for k in keys if k in r}, peak_rss=r.get("peak_rss", 0), rng=r.get("rng"))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_rss_sampler(interval: float = 0.05) -> Iterator[dict[str, int]]:
    """The peak resident memory of this process while the block runs, sampled every ``interval`` s
    (reset at entry, so one unit's peak cannot hide another's): ``{"start", "peak"}`` in bytes."""
    box = {"start": _rss_bytes(), "peak": _rss_bytes()}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            box["peak"] = max(box["peak"], _rss_bytes())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield box
    finally:
        stop.set()
        t.join()
        box["peak"] = max(box["peak"], _rss_bytes())


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class UnitStore:
    """The units of one seed under ``<out>/state/seed<seed>/``."""

    def __init__(self, out: str | Path, seed: int, log_line: Callable[[str], None] = print) -> None:
        self.seed = seed
        self.dir = Path(out) / "state" / f"seed{seed}"
        self.log_line = log_line

    def path(self, unit: str) -> Path:
        return self.dir / (unit.replace("/", "__") + ".pt")

    def done(self, unit: str) -> bool:
        return self.path(unit).is_file()

    def load(self, unit: str) -> UnitState:
        path = self.path(unit)
        try:
            return UnitState.from_record(torch.load(path, map_location="cpu", weights_only=True))
        except ValueError as err:
            raise ValueError(
                f"{path} was written by another version of the benchmark ({err}): start a new --out"
            ) from err

    def seed_unit(self, unit: str) -> None:
        """Seed torch's global generator for ``unit`` (also after a fresh model is built)."""
        torch.manual_seed(stable_seed(self.seed, unit))

    def run(self, unit: str, fn: Callable[[], UnitState]) -> UnitState:
        """The unit's saved state, or ``fn()``'s, seeded, timed, measured, saved (rank 0) and logged."""
        if self.done(unit):
            return self.load(unit)
        self.seed_unit(unit)
        with peak_rss_sampler() as mem:
            t0 = time.perf_counter()
            state = fn()
            state.seconds = time.perf_counter() - t0
        state.peak_rss = mem["peak"]
        state.rng = torch.get_rng_state()
        if rank_and_world()[0] == 0:
            atomic_save(state.to_record(), self.path(unit))
        _barrier()
        scores = ", ".join(f"{k} {v.value:.3f}" for k, v in state.evals.items())
        self.log_line(f"[seed {self.seed}] {unit}: {scores} ({state.seconds:.0f} s)")
        return state
