"""Reductions under ``torch.distributed``: importance sums and sample counts are summed over ranks.

Everything here is a no-op in a single process. A regularizer's state is identical on every rank
after ``consolidate`` because sums and counts are all-reduced before they are divided; under FSDP2
the state of a sharded parameter is sharded like it (see :doc:`/fsdp`), and :func:`full_state_dict`
gathers it whole.
"""

from __future__ import annotations

import ctypes
import io
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._sharding import full

__all__ = ["all_gather_objects", "all_reduce_sum_", "full_state_dict", "is_distributed", "rank_and_world", "shard"]


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``, ``(0, 1)`` outside torch.distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` over ranks in place, in one collective (a flat buffer per dtype)."""
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def _backend_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (tensors and plain data) in rank order; ``[obj]`` in a single process.

    Serialised with ``torch.save`` and read back with ``weights_only=True`` (no NumPy needed, unlike
    ``torch.distributed.all_gather_object``).
    """
    if not is_distributed():
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    device = _backend_device()
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload.to(device)
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    out = []
    for t, n in zip(gathered, sizes):
        raw = t[: int(n.item())].cpu().contiguous()
        data = ctypes.string_at(raw.data_ptr(), raw.numel())
        out.append(torch.load(io.BytesIO(data), weights_only=True))
    return out


def shard(n: int) -> range:
    """This rank's share of ``range(n)``: strided, no padding, so the shares partition the range."""
    rank, world = rank_and_world()
    return range(rank, n, world)


def full_state_dict(module: nn.Module, *, cpu: bool = True) -> dict[str, Any]:
    """``module.state_dict()`` with each tensor sharded by FSDP2 (a DTensor) gathered whole, on the CPU
    unless ``cpu=False``: the full form of a regularizer's state (or a :class:`~clreg.Compose`'s).

    It loads with ``load_state_dict`` into the same regularizer built on the unsharded model in one
    process, or on the model sharded over any number of ranks (each rank keeps its shard), and it is
    read back with ``torch.load(..., weights_only=True)``. Every rank must call it (one all-gather per
    sharded tensor); a state with nothing sharded comes back as it is, on the CPU.

    Example:
        >>> import torch, clreg
        >>> ewc = clreg.EWC(torch.nn.Linear(2, 1))
        >>> sorted(full_state_dict(ewc))[:2]
        ['_extra_state', 'anchor.bias']
    """
    out: dict[str, Any] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, Tensor):
            value = full(value).detach()
            value = value.cpu() if cpu else value
        out[key] = value
    return out
