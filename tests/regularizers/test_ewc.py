"""The EWC module against the explicit sum over tasks, with λ and the task weights changing."""

from __future__ import annotations

import torch

import clreg
from models import MLP, classification, explicit_ewc, train_a_bit


def test_ewc_module_equals_explicit_sum_with_changing_lambda_and_weights() -> None:
    torch.manual_seed(0)
    model = MLP()
    ewc = clreg.EWC(model, lam=2.0, estimator="exact")
    tasks = []
    for t, w in enumerate([1.0, 0.0, 3.0]):
        data = classification(t)
        train_a_bit(model, data)
        fisher = clreg.functional.fisher_diagonal(model, data, estimator="exact")
        tasks.append(
            (
                w,
                [fisher[n].double() for n in ewc.param_names],
                [p.detach().double().clone() for p in model.parameters()],
            )
        )
        ewc.consolidate(model, data, clreg.TaskSpec(weight=w))
    train_a_bit(model, classification(9))
    ewc.lam = 5.0
    theta = list(model.parameters())
    ref = explicit_ewc([p.double() for p in theta], tasks, 5.0)
    value = ewc(model)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-8)
    grads = torch.autograd.grad(value, theta)
    ref_grads = torch.autograd.grad(ref, theta)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-8)
