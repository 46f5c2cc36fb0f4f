"""``Compose``: members reached by name and by capability; attach and track without type checks."""

from __future__ import annotations

import pytest
import torch

import clreg
from models import MLP


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
