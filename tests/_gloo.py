"""A scenario run once per rank in a spawned gloo process group, for the distributed tests.

A scenario is a module-level function ``scenario(rank, world, **kwargs) -> dict`` (of tensors, or of
what ``torch.load(..., weights_only=True)`` reads back: strings, lists, nested dicts). :func:`run_ranks`
spawns ``world`` processes; each sets one thread, joins the gloo group through a file in the test's
temporary folder, runs the scenario, saves its result and leaves the group. The results come back in
rank order. A test module calls :func:`require` before it imports its worker module, which may import
``torch.distributed.fsdp``.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Scenario = Callable[..., dict[str, Any]]


def require(fsdp2: bool = False) -> None:
    """Skip the calling test module when torch.distributed (with ``fsdp2``: FSDP2's ``fully_shard``) is
    not available."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available", allow_module_level=True)
    if fsdp2:
        fsdp = pytest.importorskip("torch.distributed.fsdp", reason="torch.distributed.fsdp is not available")
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("FSDP2 (fully_shard) is not available", allow_module_level=True)


def _rank(rank: int, scenario: Scenario, world: int, init_file: str, out_dir: str, kwargs: dict) -> None:
    """One rank (``mp.spawn`` passes ``rank`` first): the group, the scenario, its result saved."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(scenario(rank, world, **kwargs), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
        gc.collect()  # a reference cycle (torch.func's) can hold the group's threads until exit, where they abort


def run_ranks(scenario: Scenario, tmp_path: str | os.PathLike, world: int = 2, **kwargs: Any) -> list[dict]:
    """``scenario(rank, world, **kwargs)`` on each rank of a ``world``-process gloo group; the results,
    by rank. A rank's exception fails the call (``mp.spawn`` raises it here)."""
    tmp = Path(tmp_path)
    init = tmp / "init"
    init.unlink(missing_ok=True)  # the file store needs a new or empty file
    files = [tmp / f"rank{r}.pt" for r in range(world)]
    for f in files:
        f.unlink(missing_ok=True)  # only this call's results count
    try:
        mp.spawn(_rank, args=(scenario, world, str(init), str(tmp), kwargs), nprocs=world, join=True)
    except mp.ProcessExitedException as err:
        # a rank killed by a signal after it saved its result died leaving the group (gloo's threads
        # aborting at exit), not in the scenario: its result stands; one that saved nothing fails the call
        if err.signal_name is None or not all(f.is_file() for f in files):
            raise
        warnings.warn(f"a rank ended with {err.signal_name} after saving its result: {err}", stacklevel=2)
    results = [torch.load(f, weights_only=True) for f in files]
    torch.set_num_threads(min(2, torch.get_num_threads()))  # as conftest.py sets it, for a reference run here
    return results
