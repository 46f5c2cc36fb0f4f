"""The distributed checks of DER / ER-ACE: run once per rank in a two-process gloo group, and once in a
single process on the concatenated batches. Each run returns a dict of tensors for the test to compare.

* ``buffer/*``: a :class:`LogitBuffer` offered per-rank batches of uneven sizes (one empty), its
  contents and each rank's first two draws;
* ``refusal/*``: a batch refused on one rank, and first batches that differ between ranks, are a
  ValueError on every rank, and the buffer goes on;
* ``ace/*``: ER-ACE's incoming loss on each rank's share, with the global present classes or the rank's;
* ``step/{ddp,fsdp}/{4,2}/*``: one SGD step of a task loss plus DER++ (draws of 4 or 2) on a
  DDP-wrapped / FSDP2-sharded model, every parameter gathered after it, and the slots each rank drew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clreg._sharding import full
from clreg.logit_buffer import LogitBuffer
from clreg.regularizers.der import DER
from clreg.regularizers.er_ace import ERACE

SIZES = [[3, 2], [1, 3], [2, 0], [4, 1]]  # per step, each rank's batch size (rank 0's samples first)
ACE_LABELS = [torch.tensor([0, 1, 1]), torch.tensor([3, 1, 3])]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def mine(parts: list, rank: int, world: int):
    """This rank's part; in a single process every part, concatenated."""
    return parts[rank] if world > 1 else torch.cat(parts)


def buffer_run(rank: int, world: int) -> dict[str, torch.Tensor]:
    buf = LogitBuffer(5, seed=7)
    start = 0
    for sizes in SIZES:
        parts, at = [], start
        for n in sizes:
            parts.append(torch.arange(at, at + n))
            at += n
        ids = mine(parts, rank, world)
        buf.observe(ids.float()[:, None], ids * 10, {"z": ids.double()[:, None] / 4})
        start = at
    draws = [buf.sample(3).index for _ in range(2)]  # each rank's first two draws of 3 (of 5 stored)
    return {
        "buffer/draws": torch.stack(draws),
        "buffer/inputs": buf.stored("inputs"),
        "buffer/labels": buf.stored("labels"),
        "buffer/outputs": buf.stored("outputs")["z"],
        "buffer/seen": torch.tensor(buf.seen),
    }


def refused(buf: LogitBuffer, *args) -> str:
    """``buf.observe(*args)``'s ValueError message, or ``""``."""
    try:
        buf.observe(*args)
    except ValueError as err:
        return str(err)
    return ""


def refusal_run(rank: int, world: int) -> dict:
    """Rank 1 (a single process: the one batch) offers outputs with a row too few; then the ranks'
    first batches differ in structure (labels on rank 1 only); then a good batch on both."""
    rows = refused(LogitBuffer(4), torch.zeros(2, 1), None, torch.zeros(1 if rank == 1 or world == 1 else 2, 3))
    labels = torch.zeros(2, dtype=torch.long) if rank == 1 else None
    buf = LogitBuffer(4)
    structure = refused(buf, torch.zeros(2, 1), labels) if world > 1 else ""
    buf.observe(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
    return {"refusal/rows": rows, "refusal/structure": structure, "refusal/seen": torch.tensor(buf.seen)}


def ace_run(rank: int, world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(3, 5, generator=g) for _ in range(2)]
    out: dict[str, torch.Tensor] = {}
    for sync in (True, False):
        er_ace = ERACE(nn.Linear(1, 5), capacity=2, sync_present=sync)
        parts = range(2) if world == 1 else [rank]
        for r in parts:
            out[f"ace/{sync}/{r}"] = er_ace.incoming_loss(logits[r], ACE_LABELS[r])
    return out


def wrap(kind: str, model: nn.Module, world: int) -> nn.Module:
    if world == 1:
        return model
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in (model.fc1, model.fc2):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def step_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Three global batches of 4 samples: the first two offer their first 2 samples (one per rank),
    the third is the trained batch (two per rank)."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 4, 4, generator=g), torch.randint(0, 3, (3, 4), generator=g)


def step_run(kind: str, rank: int, world: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Observe two global batches of 2 (one sample per rank each), then one SGD step of the task loss
    on a global batch of 4 plus DER++ with draws of ``batch_size`` (4: the whole buffer, so every
    rank's replay term is the same; 2: each rank its own draws, recorded as slots)."""
    model = wrap(kind, Net(), world)
    der = DER(model, capacity=4, alpha=0.5, beta=0.7, batch_size=batch_size)
    drawn: list[torch.Tensor] = []
    sample = der.buffer.sample

    def spy(k, generator=None, device=None):
        draw = sample(k, generator, device)
        drawn.append(draw.index)
        return draw

    der.buffer.sample = spy
    xs, ys = step_data()
    for k in range(2):
        x, y = mine(list(xs[k, :2].split(1)), rank, world), mine(list(ys[k, :2].split(1)), rank, world)
        with torch.no_grad():
            der.observe(x, y, model(x))
        with torch.no_grad():  # move the model so the stored outputs are not the current ones
            for p in model.parameters():
                p.add_(0.1)
    x, y = mine(list(xs[2].split(2)), rank, world), mine(list(ys[2].split(2)), rank, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = F.cross_entropy(model(x), y) + der(model, inputs=x)
    loss.backward()
    opt.step()
    inner = model.module if kind == "ddp" and world > 1 else model
    tag = f"step/{kind}/{batch_size}"
    out = {f"{tag}/param/{n}": full(p).detach().clone() for n, p in inner.named_parameters()}
    out[f"{tag}/draws"] = torch.stack(drawn)  # (2, batch_size): the MSE's draw, then the CE's
    return out


def scenario(rank: int, world: int) -> dict:
    out = {**buffer_run(rank, world), **refusal_run(rank, world), **ace_run(rank, world)}
    for kind in ("ddp", "fsdp"):
        for batch_size in (4, 2):
            out.update(step_run(kind, rank, world, batch_size))
    return out
