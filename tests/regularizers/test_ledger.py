"""``GradientLedger``: the channel through which penalties tell SI what they added to ``.grad``."""

from __future__ import annotations

import gc

import pytest
import torch

import clreg

THETA0, A, TARGET = [0.5, -1.0, 2.0], [1.0, 0.5, 2.0], [1.5, 0.0, 1.0]
LR, STEPS, LAM, C = 0.1, 5, 4.0, 0.7
OWN = [0.5, 1.0, 2.0]  # SI's own importance, anchor θ0


class Quad(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(THETA0))


def regularizers(model: Quad) -> tuple[clreg.EWC, clreg.SI]:
    """EWC with F = 1 at anchor 0 and an SI whose own penalty is active."""
    ewc = clreg.EWC(model, lam=LAM)
    ewc.importance.tensors[0].fill_(1.0)
    ewc._bump_tasks()
    si = clreg.SI(model, c=C, xi=0.05)
    si.importance.tensors[0].copy_(torch.tensor(OWN))
    si._bump_tasks()
    return ewc, si


def hand(ewc_in_path: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """θ and ω after the steps, in float64: ω −= g · Δθ with g the task gradient, plus EWC's when SI
    does not see EWC's records."""
    theta, omega = torch.tensor(THETA0, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    a, t, big = (torch.tensor(v, dtype=torch.float64) for v in (A, TARGET, OWN))
    anchor = theta.clone()
    for _ in range(STEPS):
        g, g_ewc = a * (theta - t), LAM * theta
        new = theta - LR * (g + g_ewc + 2 * C * big * (theta - anchor))
        omega -= (g + g_ewc if ewc_in_path else g) * (new - theta)
        theta = new
    return theta, omega


def train(model: Quad, ewc: torch.nn.Module, si: clreg.SI, mode: str) -> None:
    """SGD steps on the task loss with both penalties: attached, or in the loss with SI tracking."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if mode == "attached":
        ewc.attach(opt)
        si.attach(opt)
    else:
        si.track(opt)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = 0.5 * (torch.tensor(A) * (model.theta - torch.tensor(TARGET)) ** 2).sum()
        if mode == "autograd":
            loss = loss + ewc(model) + si(model)
        loss.backward()
        opt.step()


def check(model: Quad, si: clreg.SI, ewc_in_path: bool) -> None:
    theta, omega = hand(ewc_in_path)
    torch.testing.assert_close(model.theta.detach().double(), theta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(si.omega.tensors[0].double(), omega, rtol=1e-5, atol=1e-7)
    assert not [k for p in model.parameters() for k in p.__dict__ if "clreg" in k]


@pytest.mark.parametrize("mode", ["attached", "autograd"])
def test_compose_members_share_one_ledger_and_si_excludes_ewc(mode: str) -> None:
    model = Quad()
    ewc, si = regularizers(model)
    assert ewc.ledger is not si.ledger
    reg = clreg.Compose(ewc, si)
    assert ewc.ledger is si.ledger is reg.ledger and reg.ledger.trackers == [si]
    train(model, ewc, si, mode)
    check(model, si, ewc_in_path=False)


@pytest.mark.parametrize("mode", ["attached", "autograd"])
def test_separate_ledgers_do_not_see_each_other(mode: str) -> None:
    model = Quad()
    ewc, si = regularizers(model)
    train(model, ewc, si, mode)
    check(model, si, ewc_in_path=True)


def test_shared_ledger_set_by_hand_and_the_setter_moves_the_tracker() -> None:
    model = Quad()
    ewc, si = regularizers(model)
    old = si.ledger
    ledger = clreg.GradientLedger()
    ewc.ledger = si.ledger = ledger
    assert old.trackers == [] and ledger.trackers == [si]
    train(model, ewc, si, "autograd")
    check(model, si, ewc_in_path=False)


def test_nested_compose_shares_and_total_path_does_not_register() -> None:
    model = Quad()
    inner = clreg.Compose(clreg.EWC(model), clreg.SI(model))
    outer = clreg.Compose(clreg.MAS(model), inner, clreg.LwF(model))
    ledgers = {id(r.ledger) for r in (outer["mas"], inner["ewc"], inner["si"], outer["lwf"], inner)}
    assert ledgers == {id(outer.ledger)} and outer.ledger.trackers == [inner["si"]]
    fresh = clreg.GradientLedger()
    outer.ledger = fresh
    assert inner["si"].ledger is fresh and fresh.trackers == [inner["si"]]
    total = clreg.SI(model, path_gradient="total")
    assert total.ledger.trackers == []
    total.path_gradient = "task"
    assert total.ledger.trackers == [total]
    with pytest.raises(TypeError, match="GradientLedger"):
        total.ledger = object()


def test_a_dead_tracker_stops_the_recording() -> None:
    model = Quad()
    ewc, si = regularizers(model)
    ewc.ledger = si.ledger
    ledger, before = si.ledger, si.ledger.generation
    params = ewc._pset.last()
    assert ewc._recording(params)
    del si
    gc.collect()
    assert ledger.trackers == [] and ledger.generation != before and not ewc._recording(params)
