"""The FSDP2 checks: run once per rank in a two-process gloo group with the model ``fully_shard``ed
(each Linear, then the root), and once in a single process on the unsharded model.

Every sharded result is gathered (``full_tensor()``) before it is saved, so the test compares it with
the single run's entry of the same key. Entries under ``bytes/`` are this rank's own (not gathered);
``errors`` holds the messages of the refusals (sharded runs only).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import clreg
from clreg._sharding import full, is_sharded, local

N = 11  # odd: the ranks' shares of the samples differ in size
KINDS = ("ewc", "online_ewc", "mas", "si", "lwf")


class Net(nn.Module):
    """Linear(4, 7), BatchNorm1d(7), tanh, Linear(7, 3): 7 and 3 rows shard unevenly over two ranks (4 + 3,
    2 + 1); the BatchNorm's parameters fall to the root's FSDP group and its running statistics stay
    replicated. It trains in eval mode (frozen statistics), so each rank's half-batch step is the full
    batch's."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(4, 7)
        self.norm = nn.BatchNorm1d(7)
        self.fc2 = nn.Linear(7, 3)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 1.5)
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def shard(model: nn.Module, world: int, norm_kw: dict | None = None, **kw) -> nn.Module:
    """``fully_shard`` on each Linear (and on the BatchNorm with ``norm_kw``), then on the model (nothing
    in a single process)."""
    if world == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    m = mesh()
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=m, **kw)
        elif isinstance(layer, nn.BatchNorm1d) and norm_kw is not None:
            fully_shard(layer, mesh=m, **norm_kw)
    fully_shard(model, mesh=m, **kw)
    return model


def build(world: int, seed: int = 0, **kw) -> Net:
    return shard(Net(seed), world, **kw)


def data(seed: int = 0, n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: full(v).detach().clone() for k, v in tensors.items()}


def make(kind: str, model: nn.Module) -> clreg.Regularizer:
    return {
        "ewc": lambda: clreg.EWC(model, lam=3.0, estimator="exact"),
        "online_ewc": lambda: clreg.OnlineEWC(model, lam=2.0, gamma=0.5, estimator="mc", mc_samples=2),
        "mas": lambda: clreg.MAS(model, lam=4.0),
        "si": lambda: clreg.SI(model, c=0.5, xi=0.1),
        "lwf": lambda: clreg.LwF(model, temperature=2.0),
        "kfac_ewc": lambda: clreg.KFACEWC(model, lam=3.0, estimator="exact"),
    }[kind]()


def state_record(prefix: str, reg: clreg.Regularizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state gathered, this rank's bytes of each buffer, and whether each sharded buffer is laid out
    as its parameter."""
    out: dict[str, torch.Tensor] = {}
    params = {n: p for n, p in model.named_parameters()}
    for name, buf in reg.named_buffers():
        out[f"{prefix}/state/{name}"] = full(buf).detach().clone()
        out[f"bytes/{prefix}/{name}"] = torch.tensor(local(buf).numel() * buf.element_size())
        out[f"sharded/{prefix}/{name}"] = torch.tensor(is_sharded(buf))
        param = params.get(name.split(".", 1)[-1].replace("/", "."))
        if is_sharded(buf) and param is not None:
            same = buf.device_mesh == param.device_mesh and buf.placements == param.placements
            out[f"laid_out/{prefix}/{name}"] = torch.tensor(same and local(buf).shape == local(param).shape)
    out[f"bytes/{prefix}/state_bytes"] = torch.tensor(reg.state_bytes())
    return out


def state_cases(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Each regularizer's state as built on the model."""
    out: dict[str, torch.Tensor] = {}
    for kind in KINDS:
        model = build(world, seed=5)
        out |= state_record(f"state/{kind}", make(kind, model), model)
    return out


def scenario(rank: int, world: int, out_dir: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    out = state_cases(rank, world)
    return out, []


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res, messages = scenario(rank, world, out_dir)
        torch.save({"results": res, "errors": messages}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
