"""``state_bytes``: every buffer plus the caches, counted once in the base class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import clreg
from models import MLP, MultiHead

F32, I64, F64 = 4, 8, 8


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def task(n: int = 6) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def attached_step(model: torch.nn.Module, reg: clreg.Regularizer) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    x, y = task().tensors
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    reg.detach()


def test_quadratic_penalties_count_buffers_then_caches() -> None:
    model = MLP()
    p = n_params(model)
    for reg in (clreg.EWC(model), clreg.OnlineEWC(model, gamma=0.5), clreg.MAS(model)):
        held = 2 * F32 * p + F64 + I64  # importance, anchor, offset, n_tasks
        assert reg.state_bytes() == held
        reg.consolidate(model, task())
        reg(model)  # the autograd value keeps √A
        assert reg.state_bytes() == held + F32 * p
        attached_step(model, reg)  # the attached step keeps A·m
        assert reg.state_bytes() == held + 2 * F32 * p


def test_si_counts_its_path_and_the_gradient_snapshot() -> None:
    model = MLP()
    p = n_params(model)
    si = clreg.SI(model)
    held = 4 * F32 * p + F64 + 2 * I64  # importance, anchor, omega, previous; offset, n_tasks, steps
    assert si.state_bytes() == held
    attached_step(model, si)
    si.consolidate(model)
    si(model)
    assert si.state_bytes() == held + F32 * p  # √A
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si.attach(opt)
    x, y = task().tensors
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # an own penalty and the task path: the task gradient is kept in a snapshot
    assert si.state_bytes() == held + 3 * F32 * p  # √A, A·m, the snapshot


def test_lwf_counts_every_parameter_and_buffer_of_the_model() -> None:
    model = MultiHead(width=6)
    lwf = clreg.LwF(model)
    lwf.consolidate(model)
    bn = model.trunk[1]
    buffers = F32 * (bn.running_mean.numel() + bn.running_var.numel()) + I64  # num_batches_tracked
    assert lwf.state_bytes() == F32 * n_params(model) + buffers + I64  # + n_tasks


def test_compose_and_replay_buffer() -> None:
    model = MLP()
    reg = clreg.Compose(clreg.EWC(model), clreg.LwF(model))
    assert reg.state_bytes() == reg["ewc"].state_bytes() + reg["lwf"].state_bytes()
    buf = clreg.ReplayBuffer(2)
    buf.add("det", [(torch.zeros(3), {"boxes": torch.zeros(k, 4), "tag": "x"}) for k in (1, 3)])
    buf.add("cls", [(torch.zeros(2, dtype=torch.float64), torch.tensor(1))])
    assert buf.state_bytes() == F32 * (3 + 4 + 3 + 12) + F64 * 2 + I64
