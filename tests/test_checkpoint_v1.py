"""A checkpoint written in format version 1 (``tests/data/state_v1.pt``) loads with ``strict=True`` and
gives the values, gradients and byte counts it was saved with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import clreg
from models import MLP

DATA = Path(__file__).resolve().parent / "data"


def _maker():
    spec = importlib.util.spec_from_file_location("make_state_v1", DATA / "make_state_v1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved() -> dict:
    return torch.load(DATA / "state_v1.pt", weights_only=True)


@pytest.mark.parametrize("name", ["ewc", "online_ewc", "si", "mas", "lwf", "compose"])
def test_version_1_state_loads_and_gives_the_saved_penalty(saved: dict, name: str) -> None:
    model = MLP()
    model.load_state_dict(saved["model"])
    reg = _maker().builders(model)[name]
    reg.load_state_dict(saved["states"][name], strict=True)
    x = saved["inputs"]
    value = reg(model, inputs=x, outputs=model(x))
    torch.testing.assert_close(value.detach(), saved["values"][name], rtol=0, atol=0)
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    for g, p, ref in zip(grads, model.parameters(), saved["grads"][name]):
        torch.testing.assert_close(torch.zeros_like(p) if g is None else g, ref, rtol=0, atol=0)
    members = reg.members if isinstance(reg, clreg.Compose) else [reg]
    assert [m.state_bytes() for m in members] == saved["state_bytes"][name]
    for key, t in reg.state_dict().items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, saved["states"][name][key]), key


def test_version_1_replay_buffer_loads(saved: dict) -> None:
    buf = clreg.ReplayBuffer(1)
    buf.load_state_dict(saved["replay"], strict=True)
    assert buf.tasks == ["det", "cls"] and buf.capacity_per_task == 3
    assert buf.state_bytes() == saved["replay_bytes"]
    draw = buf.sample(4, generator=torch.Generator().manual_seed(2))
    for task, (x, _y) in saved["replay_next"].items():
        assert torch.equal(draw[task][0], x)
