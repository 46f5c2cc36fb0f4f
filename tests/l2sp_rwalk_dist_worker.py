"""L2-SP and RWalk under DDP and FSDP2: run once per rank in a two-process gloo group (see
tests/regularizers/test_l2sp_rwalk_distributed.py), and once in a single process on the unwrapped model.

The model is fsdp_worker's ``Net`` (Linear(4, 7), BatchNorm1d(7), tanh, Linear(7, 3), in eval mode): 7
and 3 rows shard unevenly over two ranks, and a rank's step on its half of the batch, its gradient
averaged over ranks, is the single process's step on the whole batch. Every sharded result is gathered
(``full_tensor()``) before it is saved, so each entry compares with the single run's entry of the same key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import clreg
from clreg._params import canonical_name
from clreg._sharding import full, is_sharded
from clreg.distributed import full_state_dict
from clreg.regularizers.l2sp import L2SP
from clreg.regularizers.rwalk import RWalk
from fsdp_worker import Net, data, gathered, half, shard

WRAPS = ("ddp", "fsdp")
HEAD = ["fc2.weight", "fc2.bias"]
BODY = ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias"]
L2SP_CASES = [(v, m) for v in ("unit", "weighted") for m in ("autograd", "attached")]
RWALK_MODES = ("attach", "track")  # tracked: with normalize=True (its minimum and maximum over ranks)
STEPS, LR = 3, 0.2
BUFFERS = ("importance", "anchor", "fisher", "score", "omega", "previous", "window_start")


def wrapped(wrap: str, world: int) -> nn.Module:
    """``Net(seed=5)`` under DDP, or ``fully_shard``ed (each Linear, then the root); itself in one process."""
    model = Net(seed=5)
    if world == 1:
        return model
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    return shard(model, world)


def omega(seed: int = 3) -> dict[str, torch.Tensor]:
    """L2-SP's given importance: whole tensors, the same on every rank (each keeps its shard)."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(Net(seed=5).named_parameters())
    return {n: torch.rand(shapes[n].shape, generator=g) + 0.1 for n in BODY}


def named(model: nn.Module) -> dict[str, torch.Tensor]:
    return {canonical_name(n): p for n, p in model.named_parameters()}


def perturb(model: nn.Module, size: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(named(model).values()):
            p.add_(size * (i + 1))


def batch(rank: int, world: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data(seed=seed, n=8).tensors
    return x[half(rank, world)], y[half(rank, world)]


def l2sp_case(wrap: str, variant: str, mode: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """L2-SP with the head's plain L2, moved off its start, then STEPS SGD steps: per step the value and
    the gradient the optimizer used, the penalty's own gradient once, the state's layout, the parameters."""
    model = wrapped(wrap, world)
    reg = L2SP(model, alpha=0.7, beta=0.3, head_params=HEAD, importance=omega() if variant == "weighted" else None)
    perturb(model, 0.05)
    params = named(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if mode == "attached":
        reg.attach(opt)
    seen: list[dict[str, torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(gathered({n: p.grad for n, p in params.items()})))
    out: dict[str, torch.Tensor] = {}
    x, y = batch(rank, world, seed=9)
    for s in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        value = reg(model)
        if mode == "autograd":
            if s == 0:
                own = torch.autograd.grad(value, list(params.values()), retain_graph=True)
                out |= {f"penalty_grad/{n}": full(g).clone() for n, g in zip(params, own)}
            loss = loss + value
        loss.backward()
        opt.step()
        out[f"value/{s}"] = value.detach().clone()
        out |= {f"grad/{s}/{n}": g for n, g in seen[s].items()}
    out |= {f"param/{n}": p for n, p in gathered(params).items()}
    stores = [reg.anchor, *([reg.importance] if variant == "weighted" else [])]
    out["state_sharded"] = torch.tensor([is_sharded(t) for store in stores for t in store.tensors])
    return out


def rwalk_case(wrap: str, mode: str, rank: int, world: int) -> tuple[dict[str, torch.Tensor], dict]:
    """RWalk with an L2-SP on its ledger (a Compose): two tasks of five steps (windows of two: two full
    windows and one left open each), then the state, the parameters and the value after a perturbation;
    and the full form of the state. Tracked, the importance is normalised."""
    model = wrapped(wrap, world)
    rwalk = RWalk(model, lam=2.0, alpha=0.5, eps=1e-2, update_every=2, normalize=mode == "track")
    reg = clreg.Compose(L2SP(model, alpha=0.3), rwalk)
    for seed in (6, 9):
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        reg.attach(opt) if mode == "attach" else reg.track(opt)
        x, y = batch(rank, world, seed)
        for _ in range(5):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            (loss if mode == "attach" else loss + reg(model)).backward()
            opt.step()
        reg.detach()
        reg.consolidate(model)
    out = {
        f"state/{b}/{n}": t
        for b in BUFFERS
        for n, t in gathered(dict(zip(rwalk.param_names, getattr(rwalk, b).tensors))).items()
    }
    out["state_sharded"] = torch.tensor([is_sharded(t) for b in BUFFERS for t in getattr(rwalk, b).tensors])
    perturb(model, 0.03)
    out["value"] = reg(model).detach().clone()
    out |= {f"param/{n}": p for n, p in gathered(named(model)).items()}
    return out, full_state_dict(reg)


def scenario(rank: int, world: int, wraps: tuple[str, ...] = WRAPS) -> dict:
    """Under each wrap: every case's results (``{wrap}``) and RWalk's full state per mode
    (``{wrap}/full_state``)."""
    saved: dict = {}
    for wrap in wraps:
        out: dict[str, torch.Tensor] = {}
        for variant, mode in L2SP_CASES:
            out |= {f"l2sp/{variant}/{mode}/{k}": v for k, v in l2sp_case(wrap, variant, mode, rank, world).items()}
        states = {}
        for mode in RWALK_MODES:
            result, states[mode] = rwalk_case(wrap, mode, rank, world)
            out |= {f"rwalk/{mode}/{k}": v for k, v in result.items()}
        saved[wrap], saved[f"{wrap}/full_state"] = out, states
    return saved
