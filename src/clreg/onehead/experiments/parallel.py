"""A run's units over several worker processes on one machine (``--workers N``).

The units of a run form two waves: each seed's shared work (stage 1, the single-task baselines and
the joint reference), then each (seed, method) pair's later stages, which start from that seed's
stage 1. Each wave's jobs go to N processes, each with ``threads // N`` intra-op threads, and every
unit lands in the run's unit store as it would in one process; the run then reads them all back and
writes its report. Units are seeded by (seed, unit), so each is the unit one process would train,
up to the floating-point roundings of another thread count. On the 2-core reference machine two
one-thread processes trained 1.27× the steps per second of one two-thread process.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence

import torch

from ..config import BenchmarkConfig
from ..methods import Method
from ..protocol import method_stages, run_seed

__all__ = ["run_in_workers", "worker_threads"]

Job = tuple[int, str | None]  # (seed, method name or None for the seed's shared units)

_WORKSPACE = None


def worker_threads(workers: int) -> int:
    """Intra-op threads per worker: this process's threads shared out, at least one each."""
    return max(1, torch.get_num_threads() // workers)


def _start(config: BenchmarkConfig, threads: int) -> None:
    from .workspace import open_workspace

    global _WORKSPACE
    torch.set_num_threads(threads)
    _WORKSPACE = open_workspace(config)


def _job(job: Job) -> None:
    ws = _WORKSPACE
    seed, name = job
    run = ws.seed_run(seed)
    if name is None:
        run_seed(run, [], ws.config.joint)
    else:
        method_stages(run, Method.parse(name, ws.config.settings_for(name)))


def run_in_workers(config: BenchmarkConfig, workers: int, seeds: Sequence[int], methods: Sequence[str]) -> None:
    """Train every unit of ``seeds`` × ``methods`` (and each seed's shared units) in ``workers``
    processes; what is already in the store is read back, not trained."""
    if workers < 2:
        raise ValueError(f"run_in_workers needs at least 2 workers, got {workers}")
    threads = worker_threads(workers)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_start, initargs=(config, threads), maxtasksperchild=None) as pool:
        pool.map(_job, [(seed, None) for seed in seeds], chunksize=1)
        pool.map(_job, [(seed, name) for seed in seeds for name in methods], chunksize=1)
