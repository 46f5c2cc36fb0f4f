"""``Compose``: the sum of its members, routed data, a round trip; members reached by name and by capability;
attach and track without type checks."""

from __future__ import annotations

import pytest
import torch

import clreg
from models import MLP, classification, train_task


def test_capabilities_are_class_attributes() -> None:
    attachable = {c.__name__: c.attachable for c in (clreg.EWC, clreg.OnlineEWC, clreg.SI, clreg.MAS, clreg.LwF)}
    assert attachable == {"EWC": True, "OnlineEWC": True, "SI": True, "MAS": True, "LwF": False}
    tracks = {c.__name__: c.tracks_path for c in (clreg.EWC, clreg.OnlineEWC, clreg.SI, clreg.MAS, clreg.LwF)}
    assert tracks == {"EWC": False, "OnlineEWC": False, "SI": True, "MAS": False, "LwF": False}


def test_attach_attaches_every_attachable_member_nested_too() -> None:
    model = MLP()
    inner = clreg.Compose(clreg.SI(model), clreg.LwF(model))
    reg = clreg.Compose(clreg.EWC(model), inner, clreg.MAS(model))
    assert reg.members_that("attachable") == [reg["ewc"], inner["si"], reg["mas"]]
    assert reg.members_that("tracks_path") == [inner["si"]]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    reg.attach(opt, scaler=scaler)
    assert [r.attached for r in (reg["ewc"], inner["si"], reg["mas"], inner["lwf"])] == [True, True, True, False]
    assert inner["si"]._scaler is scaler
    reg.detach()
    assert not any(r.attached for r in reg.members_that("attachable"))
    with pytest.raises(ValueError, match="capability must be one of"):
        reg.members_that("si")


def test_track_starts_the_path_of_every_tracker() -> None:
    model = MLP()
    reg = clreg.Compose(clreg.EWC(model), clreg.SI(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.track(opt)
    x = torch.randn(3, 4)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    assert int(reg["si"].steps) == 1 and not reg["ewc"].attached
    with pytest.raises(ValueError, match="no member of this Compose tracks"):
        clreg.Compose(clreg.EWC(model)).track(opt)
    with pytest.raises(TypeError, match="does not track"):
        clreg.EWC(model).track(opt)
    clreg.EWC(model).attach(opt, scaler=None)  # one signature for every regularizer


def test_a_saved_path_loads_into_the_member_found_by_capability_or_name() -> None:
    """An unregularized stage tracks a fresh SI's path; a later Compose takes that state."""
    model = MLP()
    first = clreg.SI(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first.track(opt)
    opt.zero_grad()
    model(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    reg = clreg.Compose(clreg.EWC(model), clreg.SI(model, c=2.0))
    (tracker,) = reg.members_that("tracks_path")
    assert tracker is reg["si"]
    tracker.load_state_dict(first.state_dict())
    tracker.c = 0.3
    assert reg["si"].c == 0.3 and torch.equal(reg["si"].omega.tensors[0], first.omega.tensors[0])


def test_compose_sums_routes_and_round_trips() -> None:
    torch.manual_seed(0)
    model = MLP()
    reg = clreg.Compose(clreg.EWC(model, lam=2.0), clreg.LwF(model), clreg.EWC(model, lam=1.0))
    assert reg.names == ["ewc", "lwf", "ewc_1"]
    train_task(model, reg, classification(0, n=12))
    x = torch.randn(3, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    out = model(x)
    total = reg(model, inputs=x, outputs=out)
    parts = [r(model, inputs=x, outputs=out) for r in reg.members]
    torch.testing.assert_close(total, sum(parts))
    assert set(reg.last_values) == {"ewc", "lwf", "ewc_1"} and reg.last_values["lwf"] > 0
    fresh = clreg.Compose(clreg.EWC(model), clreg.LwF(model), clreg.EWC(model))
    fresh.load_state_dict(reg.state_dict(), strict=True)
    torch.testing.assert_close(fresh(model, inputs=x, outputs=out), total)
    assert reg["lwf"] is reg.members[1]
    with pytest.raises(TypeError, match="clreg regularizers"):
        clreg.Compose(torch.nn.Linear(1, 1))


def test_attached_without_a_hook_the_loop_calls_pre_step() -> None:
    """``attach(optimizer, hook=False)`` then ``pre_step()`` after the backward gives the step the
    hooked attached mode gives; ``autograd_value`` is what the loop still adds to its loss (LwF)."""
    import torch.nn.functional as F

    results = []
    for hook in (True, False):
        torch.manual_seed(0)
        model = MLP()
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        ewc, si, lwf = clreg.EWC(model, lam=2.0, estimator="exact"), clreg.SI(model, c=0.3), clreg.LwF(model)
        reg = clreg.Compose(ewc, si, lwf)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        si.track(opt)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        si.detach()
        reg.consolidate(model, torch.utils.data.TensorDataset(x, y))
        reg.attach(opt, hook=hook)
        for _ in range(3):
            out = model(x)
            loss = F.cross_entropy(out, y) + reg.autograd_value(model, inputs=x, outputs=out)
            opt.zero_grad()
            loss.backward()
            if not hook:
                reg.pre_step()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()] + [si.omega.tensors[0].clone()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="attach\\(optimizer, hook=False\\) first"):
        clreg.EWC(MLP()).pre_step()
