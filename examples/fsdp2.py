"""Two processes with torchrun and FSDP2: the model ``fully_shard``ed (each Linear, then the root) on
the CPU over gloo, EWC attached to the optimizer, its Fisher and state sharded like the parameters;
a checkpoint through torch.distributed.checkpoint and the full form read back in one process.

    torchrun --nproc-per-node 2 examples/fsdp2.py [--smoke]

About a minute on two CPU cores (a few seconds with --smoke): naive fine-tuning, then EWC, each over
two tasks.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from toy_tasks import accuracy, make_task, mlp

import clreg
from clreg.distributed import full_state_dict


def sharded(model: torch.nn.Module, mesh) -> torch.nn.Module:
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root takes what no inner call took
    return model


def train(model, tasks, epochs: int, ewc: clreg.EWC | None) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if ewc is not None:
        ewc.attach(opt)  # the penalty's gradient on the local shards, after FSDP's reduce-scatter
    for train_set, _ in tasks:
        sampler = DistributedSampler(train_set, shuffle=True, seed=0)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for x, y in DataLoader(train_set, batch_size=16, sampler=sampler):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        if ewc is not None:
            ewc.consolidate(model, train_set)  # samples sharded over ranks, statistics reduce-scattered
    with torch.no_grad():  # each forward gathers the parameters: every rank evaluates
        return [accuracy(model, test) for _, test in tasks]


def checkpoint(model, ewc: clreg.EWC, rank: int) -> None:
    """DCP (each rank writes its shards) and the full form, read back into an unsharded model in one
    process: the same penalty."""
    value = ewc(model).item()
    folder = tempfile.mkdtemp() if rank == 0 else None
    shared = [folder]
    dist.broadcast_object_list(shared, src=0)
    folder = shared[0]
    dcp.save({"model": get_model_state_dict(model), "ewc": ewc.state_dict()}, checkpoint_id=os.path.join(folder, "dcp"))
    whole = full_state_dict(ewc)  # every rank takes part; gathered on the CPU
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(whole, os.path.join(folder, "ewc_full.pt"))
        plain = mlp()
        plain.load_state_dict(params)  # the gathered parameters
        again = clreg.EWC(plain, lam=ewc.lam)
        again.load_state_dict(torch.load(os.path.join(folder, "ewc_full.pt"), weights_only=True))
        same = abs(again(plain).item() - value) <= 1e-5 * max(1.0, abs(value))
        print(
            f"checkpoint: DCP written by {dist.get_world_size()} ranks; "
            f"the full form in one process gives the same penalty: {same}"
        )
    dist.barrier()
    if rank == 0:
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    n, epochs = (300, 1) if args.smoke else (2000, 5)
    tasks = [make_task(1, n), make_task(2, n)]
    torch.manual_seed(0)
    naive = train(sharded(mlp(), mesh), tasks, epochs, None)
    torch.manual_seed(0)
    model = sharded(mlp(), mesh)
    # the mc Fisher: a confident model has a small one, hence a large λ (after --smoke's single epoch the
    # model is less sure and its Fisher larger: a large λ would make SGD's steps diverge)
    ewc = clreg.EWC(model, lam=1.0 if args.smoke else 1e5)
    kept = train(model, tasks, epochs, ewc)
    mine, whole = ewc.state_bytes(), sum(4 * 2 * p.numel() for p in model.parameters())
    if rank == 0:
        print(f"world size {world}")
        print(f"naive fine-tuning: task 1 {naive[0]:.3f}  task 2 {naive[1]:.3f}")
        print(f"EWC (lam={ewc.lam:g}): task 1 kept {kept[0]:.3f}  task 2 {kept[1]:.3f}")
        print(f"EWC state bytes per rank: {mine} (importance and anchor of the whole model: {whole})")
    checkpoint(model, ewc, rank)
    dist.destroy_process_group()
    gc.collect()  # see torchrun_ddp.py: joins gloo's threads before interpreter shutdown


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
