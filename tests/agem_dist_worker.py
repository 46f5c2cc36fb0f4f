"""A-GEM under DDP and FSDP2: run once per rank in a two-process gloo group (see test_agem_distributed.py).

Each rank trains its half of a batch through DDP (and then through a ``fully_shard``-ed MLP) with A-GEM
attached, drawing its own samples from a memory that is identical on every rank, and records, per step,
the parameters before the step, the samples it drew and the gradient the optimizer used (whole tensors).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

import clreg
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


def scenario(rank: int, world: int) -> dict[str, torch.Tensor]:
    model = new_model()
    ddp = DDP(model)
    memory = clreg.ReplayBuffer(8, seed=0)
    mx, my = memory_data()
    memory.add(0, (mx[rank::world], my[rank::world]))  # gathered: the same memory on every rank
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(m, x, y):
        drawn.append((x.clone(), y.clone()))
        return loss_fn(m, x, y)

    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    agem = AGEM(ddp, spy, memory=memory, sample_size=SAMPLE_SIZE, seed=3).attach(opt)
    used: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append([p.grad.clone() for p in model.parameters()]))
    x, y = task_data()
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    out: dict[str, torch.Tensor] = {}
    for s in range(STEPS):
        for i, p in enumerate(model.parameters()):
            out[f"before/{s}/{i}"] = p.detach().clone()
        opt.zero_grad()
        loss_fn(ddp, x[lo:hi], y[lo:hi]).backward()
        opt.step()
        out[f"drawn_x/{s}"], out[f"drawn_y/{s}"] = drawn[s]
        for i, g in enumerate(used[s]):
            out[f"used/{s}/{i}"] = g
    out["projections"] = agem.projections.clone()
    out["memory"] = torch.stack([sample[0] for sample in memory.samples(0)])
    own = AGEM(ddp, loss_fn, capacity_per_task=5, seed=2)  # its own memory, filled from a Dataset
    own.consolidate(ddp, TensorDataset(mx, my))
    out["own_memory"] = torch.stack([sample[0] for sample in own.memory.samples(0)])
    return out


def new_mlp() -> torch.nn.Sequential:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def sharded_scenario(rank: int, world: int) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    model = new_mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    memory = clreg.ReplayBuffer(8, seed=0)
    mx, my = memory_data()
    memory.add(0, (mx[rank::world], my[rank::world]))
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(m, x, y):
        drawn.append((x.clone(), y.clone()))
        return loss_fn(m, x, y)

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    agem = AGEM(model, spy, memory=memory, sample_size=SAMPLE_SIZE, seed=3).attach(opt)
    used: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append([p.grad.full_tensor() for p in model.parameters()]))
    x, y = task_data()
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    out: dict[str, torch.Tensor] = {}
    for s in range(STEPS):
        for i, p in enumerate(model.parameters()):
            out[f"before/{s}/{i}"] = p.detach().full_tensor()
        opt.zero_grad()
        loss_fn(model, x[lo:hi], y[lo:hi]).backward()
        opt.step()
        out[f"drawn_x/{s}"], out[f"drawn_y/{s}"] = drawn[s]
        for i, g in enumerate(used[s]):
            out[f"used/{s}/{i}"] = g
    out["projections"] = agem.projections.clone()
    return out


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(scenario(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
        torch.save(sharded_scenario(rank, world), os.path.join(out_dir, f"sharded{rank}.pt"))
    finally:
        dist.destroy_process_group()
