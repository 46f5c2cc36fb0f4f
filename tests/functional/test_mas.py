"""The MAS importance against a per-sample loop."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from clreg.functional import mas_importance
from models import MLP, per_sample_grads


def test_mas_importance_equals_per_sample_loop() -> None:
    torch.manual_seed(2)
    model = MLP()
    x = torch.randn(7, 4)
    grads = per_sample_grads(model, lambda i: model(x[i : i + 1]).square().sum(), 7)
    ref = {k: torch.stack([g[k].abs() for g in grads]).mean(0) for k in grads[0]}
    got = mas_importance(model, TensorDataset(x))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    normed = mas_importance(model, TensorDataset(x), normalize=True)
    for k in ref:
        torch.testing.assert_close(normed[k], ref[k] / 3)  # mean over the 3 outputs
    loop = mas_importance(model, TensorDataset(x), vectorize=False)
    for k in ref:
        torch.testing.assert_close(loop[k], ref[k])
