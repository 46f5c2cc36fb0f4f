"""A model that is one layer (its root module is the ``nn.Linear`` or ``nn.Conv2d``, named ``""``): every
regularizer trains, consolidates, penalises and checkpoints it; EWC's value against the closed form."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import clreg
from models import train_task

KINDS = ["ewc", "online_ewc", "si", "mas", "lwf", "kfac_ewc"]


def build(kind: str, model: nn.Module) -> clreg.Regularizer:
    return {
        "ewc": lambda: clreg.EWC(model, lam=3.0, estimator="empirical"),
        "online_ewc": lambda: clreg.OnlineEWC(model, lam=2.0, gamma=0.5, estimator="empirical"),
        "si": lambda: clreg.SI(model, c=0.5, xi=0.1),
        "mas": lambda: clreg.MAS(model, lam=4.0),
        "lwf": lambda: clreg.LwF(model, temperature=2.0),
        "kfac_ewc": lambda: clreg.KFACEWC(model, lam=2.0, estimator="empirical"),
    }[kind]()


def linear_task(seed: int) -> tuple[nn.Module, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    return nn.Linear(5, 4), TensorDataset(torch.randn(12, 5, generator=g), torch.randint(0, 4, (12,), generator=g))


def conv_task(seed: int) -> tuple[nn.Module, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 3, 6, 6, generator=g), torch.randint(0, 4, (6, 4, 4), generator=g)
    return nn.Conv2d(3, 4, 3), TensorDataset(x, y)


TASKS = {"linear": linear_task, "conv": conv_task}


@pytest.mark.parametrize("layer", sorted(TASKS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_one_layer_model_trains_consolidates_and_checkpoints(kind: str, layer: str) -> None:
    torch.manual_seed(0)
    model, data = TASKS[layer](0)
    reg = build(kind, model)
    train_task(model, reg, data)
    train_task(model, reg, TASKS[layer](1)[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = data.tensors[0]
    value = reg(model, inputs=x, outputs=model(x))
    assert value.item() > 0
    assert all(k and ".." not in k and not k.endswith(".") for k in reg.state_dict())
    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    buf.seek(0)
    fresh = build(kind, model)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    torch.testing.assert_close(fresh(model, inputs=x, outputs=model(x)), value)


def test_kfac_ewc_names_the_root_layer_in_its_state() -> None:
    model, data = linear_task(0)
    reg = clreg.KFACEWC(model)
    reg.consolidate(model, data)
    assert reg.kfac_layers == [""]
    assert {"factor_a.<root>", "factor_g.<root>", "anchor.weight", "anchor.bias"} <= set(reg.state_dict())


def test_ewc_on_a_root_linear_equals_the_closed_form() -> None:
    """(λ/2) Σ F (θ − θ*)², with the exact Fisher of a linear-softmax layer written here:
    F_W[c, i] = mean_n Σ_k p_k (δ_kc − p_c)² x_i², F_b[c] = mean_n Σ_k p_k (δ_kc − p_c)²."""
    torch.manual_seed(1)
    model, data = linear_task(2)
    model = model.double()
    x = data.tensors[0].double()
    reg = clreg.EWC(model, lam=3.0, estimator="exact")
    reg.consolidate(model, TensorDataset(x, data.tensors[1]))
    p = torch.softmax(model(x), 1).detach()
    scores = torch.eye(4, dtype=torch.float64)[None] - p[:, None, :]  # (n, k, c): e_k − p
    per_output = (p[:, :, None] * scores.square()).sum(1)  # (n, c)
    f_w = (per_output[:, :, None] * x[:, None, :].square()).mean(0)
    f_b = per_output.mean(0)
    dw, db = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        model.weight.add_(dw)
        model.bias.add_(db)
    expected = 3.0 / 2 * ((f_w * dw.square()).sum() + (f_b * db.square()).sum())
    torch.testing.assert_close(reg(model).double(), expected)
