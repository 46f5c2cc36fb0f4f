"""EWC + LwF under DeepSpeed's ZeRO stages on two CPU processes, against the same run in one process.

    DS_BUILD_OPS=0 pip install deepspeed        # not an extra of clreg
    python benchmarks/deepspeed_zero.py          # prints one JSON line per ZeRO stage

An MLP trains two tasks of five SGD steps; each rank takes four of the eight samples a step, adds
``Compose(EWC(lam=5, estimator="exact"), LwF(temperature=2))`` to its loss (the autograd mode) and
consolidates each task on the whole task's Dataset (clreg splits a map-style dataset over the ranks).
Each line gives the largest difference of the final parameters from the one-process run (relative to
the parameter's largest entry), or the error, and what ``reg.attach(engine.optimizer)`` says.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import clreg

STEPS, LR, WORLD = 5, 0.1, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def task_data(task: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(task)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def regularizer(model: nn.Module) -> clreg.Compose:
    return clreg.Compose(clreg.EWC(model, lam=5.0, estimator="exact"), clreg.LwF(model, temperature=2.0))


def one_process() -> list[torch.Tensor]:
    model = make_model()
    reg = regularizer(model)
    for task in (1, 2):
        x, y = task_data(task)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for _ in range(STEPS):
            out = model(x)
            loss = F.cross_entropy(out, y) + reg(model, inputs=x, outputs=out)
            opt.zero_grad()
            loss.backward()
            opt.step()
        reg.consolidate(model, TensorDataset(x, y), clreg.TaskSpec())
    return [p.detach().clone() for p in model.parameters()]


def _train(engine, rank: int) -> list[torch.Tensor]:
    reg = regularizer(engine.module)
    for task in (1, 2):
        x, y = task_data(task)
        xs, ys = x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]
        for _ in range(STEPS):
            out = engine(xs)
            engine.backward(F.cross_entropy(out, ys) + reg(engine.module, inputs=xs, outputs=out))
            engine.step()
        reg.consolidate(engine.module, TensorDataset(x, y), clreg.TaskSpec())
    return [p.detach().clone() for p in engine.module.parameters()]


def worker(rank: int, stage: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")  # fmt: skip
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = make_model()
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config)
    result: dict = {}
    try:
        result["params"] = [p.tolist() for p in _train(engine, rank)]
    except (TypeError, ValueError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    try:
        clreg.EWC(engine.module, lam=1.0).attach(engine.optimizer)
        result["attach"] = "accepted"
    except (TypeError, ValueError) as e:
        result["attach"] = f"{type(e).__name__}: {e}"
    if rank == 0:
        with open(path, "w") as f:
            json.dump(result, f)


def main() -> None:
    reference = one_process()
    for stage in (0, 1, 2, 3):
        path = os.path.join(tempfile.mkdtemp(), "rank0.json")
        mp.spawn(worker, args=(stage, 29600 + stage, path), nprocs=WORLD)
        with open(path) as f:
            result = json.load(f)
        line = {"zero_stage": stage, "attach": result["attach"]}
        if "error" in result:
            line["error"] = result["error"]
        else:
            line["max_rel_diff"] = max(
                float((torch.tensor(a) - b).abs().max() / b.abs().max()) for a, b in zip(result["params"], reference)
            )
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
