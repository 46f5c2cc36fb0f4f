"""FeatureDistillation under DDP and FSDP2: one SGD step per rank on half the batch, in a two-process
gloo group, and the same step in a single process on the whole batch (see
tests/regularizers/test_feature_distillation_distributed.py).

The model trains in eval mode (BatchNorm's running statistics frozen, as the teacher's are), so a
rank's half-batch step is half of the whole batch's: the value is a mean over samples, DDP and FSDP
average the gradients over ranks, and the all-reduced mean of the ranks' values is the whole batch's.
Every sharded result is gathered (``full_tensor()``) before it is saved.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clreg._sharding import full, is_sharded
from clreg.regularizers.feature_distillation import FeatureDistillation

KINDS = ("l2", "cosine", "pod")
WRAPS = ("ddp", "fsdp")
MODULES = ["stem", "block"]


class ConvNet(nn.Module):
    """stem: Conv-BN-Tanh, block: Conv-Tanh, head: global mean, Linear to 3 classes; ``channels`` are
    the input's, the stem's and the block's. Here (2, 5, 3): 5 and 3 output channels shard unevenly
    over two ranks. The unit tests use it too."""

    def __init__(self, channels: tuple[int, int, int] = (2, 5, 3), seed: int = 0) -> None:
        super().__init__()
        c_in, c_stem, c_block = channels
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(c_in, c_stem, 3, padding=1), nn.BatchNorm2d(c_stem), nn.Tanh())
        self.block = nn.Sequential(nn.Conv2d(c_stem, c_block, 3, padding=1), nn.Tanh())
        self.head = nn.Linear(c_block, 3)
        with torch.no_grad():
            self.stem[1].running_mean.uniform_(-0.3, 0.3)
            self.stem[1].running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def wrapped(wrap: str, world: int) -> nn.Module:
    """The model under DDP, or with ``fully_shard`` on each conv and linear layer and the root (as it is
    in a single process)."""
    model = ConvNet().eval()
    if world == 1:
        return model
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 2, 5, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def step(wrap: str, kind: str, watched: bool, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Consolidate, move the parameters, then one SGD step with the task loss and the distillation."""
    model = wrapped(wrap, world)
    fd = FeatureDistillation(model, modules=MODULES, kind=kind, alpha=2.0)
    fd.consolidate(model)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.03 * (i + 1))
    key = f"{wrap}/{kind}/{'watched' if watched else 'second'}"
    out = {f"{key}/teacher_sharded": torch.tensor(any(is_sharded(t) for t in fd.teacher_params.tensors))}
    x, y = (t[rank * 8 // world : (rank + 1) * 8 // world] for t in data())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    if watched:
        with fd.watch(model):
            logits = model(x)
    else:
        logits = model(x)
    value = fd(model, inputs=x, outputs=logits)
    (F.cross_entropy(logits, y) + value).backward()
    opt.step()
    value = value.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    out[f"{key}/value"] = value
    inner = model.module if wrap == "ddp" and world > 1 else model
    out |= {f"{key}/param/{n}": full(p).detach().clone() for n, p in inner.named_parameters()}
    out |= {
        f"{key}/teacher/{n}": full(t).detach().clone()
        for n, t in zip(fd.teacher_params.names, fd.teacher_params.tensors)
    }
    return out


def scenario(rank: int, world: int) -> dict:
    """Every watched step, DDP's step with a second forward (``results``), and FSDP2's refusal of one
    (``refusal``: its message; empty in a single process)."""
    out: dict[str, torch.Tensor] = {}
    for wrap in WRAPS:
        for kind in KINDS:
            out |= step(wrap, kind, True, rank, world)
    out |= step("ddp", "pod", False, rank, world)
    refusal = ""
    if world > 1:
        try:
            step("fsdp", "pod", False, rank, world)
        except ValueError as err:
            refusal = str(err)
    return {"results": out, "refusal": refusal}
