"""Two processes with torchrun: DDP training with EWC; the Fisher of a Dataset is sharded over ranks
and all-reduced, so every rank holds the same state as a single process would.

    torchrun --nproc_per_node 2 examples/torchrun_ddp.py [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from toy_tasks import accuracy, make_task, mlp

import clreg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = 200 if args.smoke else 2000
    tasks = [make_task(1, n), make_task(2, n)]
    model = DDP(mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ewc = clreg.EWC(model, lam=1e5).attach(opt)  # the gradient is added after DDP's all-reduce
    for train, _ in tasks:
        sampler = DistributedSampler(train, shuffle=True, seed=0)
        for epoch in range(1 if args.smoke else 5):
            sampler.set_epoch(epoch)
            for x, y in DataLoader(train, batch_size=16, sampler=sampler):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        ewc.consolidate(model, train)  # each rank takes a strided share; sums are all-reduced
    total = sum(float(t.sum()) for t in ewc.importance.tensors)
    totals = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(totals, torch.tensor([total]))
    if rank == 0:
        accs = [accuracy(model.module, test) for _, test in tasks]
        print(f"world size {world}: task 1 {accs[0]:.3f}  task 2 {accs[1]:.3f}")
        print("importance identical on every rank:", all(torch.equal(t, totals[0]) for t in totals))
    dist.destroy_process_group()
    # a reference cycle (from torch.func's transforms) can keep the group's threads alive until the
    # interpreter shuts down, where they abort; collecting it now joins them cleanly
    gc.collect()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
