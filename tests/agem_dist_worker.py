"""A-GEM under DDP and FSDP2: run once per rank in a two-process gloo group (see test_agem_distributed.py).

Each rank trains its half of a batch through DDP (and then through a ``fully_shard``-ed MLP) with A-GEM
attached, drawing its own samples from a memory that is identical on every rank, and records, per step,
the parameters before the step, the samples it drew and the gradient the optimizer used (whole tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

import clreg
from clreg._sharding import full
from clreg.regularizers.agem import AGEM

STEPS, SAMPLE_SIZE, BATCH = 2, 3, 8


def memory_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(8, 4, generator=g), torch.randint(1, 3, (8,), generator=g)


def task_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    return torch.randn(BATCH, 4, generator=g), torch.zeros(BATCH, dtype=torch.int64)


def new_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def loss_fn(m, x, y) -> torch.Tensor:
    return F.cross_entropy(m(x), y)


def new_mlp() -> torch.nn.Sequential:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def wrapped(wrap: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model and what trains it: ``new_model()`` and its DDP wrapper, or ``new_mlp()`` with
    ``fully_shard`` on each Linear and the root (both the same module)."""
    if wrap == "ddp":
        model = new_model()
        return model, DDP(model)
    from torch.distributed.fsdp import fully_shard

    model = new_mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    return model, fully_shard(model)


def agem_run(rank: int, world: int, wrap: str) -> dict[str, torch.Tensor]:
    """STEPS steps on this rank's half of the batch with A-GEM attached; every tensor whole (gathered)."""
    model, trained = wrapped(wrap)
    memory = clreg.ReplayBuffer(8, seed=0)
    mx, my = memory_data()
    memory.add(0, (mx[rank::world], my[rank::world]))  # gathered: the same memory on every rank
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(m, x, y):
        drawn.append((x.clone(), y.clone()))
        return loss_fn(m, x, y)

    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    agem = AGEM(trained, spy, memory=memory, sample_size=SAMPLE_SIZE, seed=3).attach(opt)
    used: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append([full(p.grad).clone() for p in model.parameters()]))
    x, y = task_data()
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    out: dict[str, torch.Tensor] = {}
    for s in range(STEPS):
        for i, p in enumerate(model.parameters()):
            out[f"before/{s}/{i}"] = full(p.detach()).clone()
        opt.zero_grad()
        loss_fn(trained, x[lo:hi], y[lo:hi]).backward()
        opt.step()
        out[f"drawn_x/{s}"], out[f"drawn_y/{s}"] = drawn[s]
        for i, g in enumerate(used[s]):
            out[f"used/{s}/{i}"] = g
    out["projections"] = agem.projections.clone()
    out["memory"] = torch.stack([sample[0] for sample in memory.samples(0)])
    if wrap == "ddp":
        own = AGEM(trained, loss_fn, capacity_per_task=5, seed=2)  # its own memory, filled from a Dataset
        own.consolidate(trained, TensorDataset(mx, my))
        out["own_memory"] = torch.stack([sample[0] for sample in own.memory.samples(0)])
    return out


def scenario(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """Under DDP (``rank``) and under FSDP2 (``sharded``)."""
    return {"rank": agem_run(rank, world, "ddp"), "sharded": agem_run(rank, world, "fsdp")}
