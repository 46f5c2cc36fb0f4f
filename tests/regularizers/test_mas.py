"""The MAS module's penalty against its importance and anchor."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import clreg
from clreg import OutputSpec, TaskSpec
from clreg.functional import mas_importance
from models import MultiHead


def test_mas_module_penalty() -> None:
    torch.manual_seed(3)
    model = MultiHead()
    mas = clreg.MAS(model, lam=2.0, normalize=True)
    data = TensorDataset(torch.randn(4, 3, 5, 5))
    spec = TaskSpec(outputs=[OutputSpec(select="seg")])
    mas.consolidate(model, data, spec)
    omega = mas_importance(model, data, outputs=spec.outputs, normalize=True)
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    ref = 2.0 * sum((omega[n] * (p - a) ** 2).sum() for (n, p), a in zip(model.named_parameters(), anchor))
    torch.testing.assert_close(mas(model), ref)
