"""The EWC module against the explicit sum over tasks, with λ and the task weights changing."""

from __future__ import annotations

import pytest
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


def test_a_normalised_fisher_has_mean_one_per_task_and_is_the_plain_one_rescaled() -> None:
    """With ``normalize="mean"`` each task's Fisher is divided by its mean over every entry before it
    is weighted and folded in: EWC's importance after two tasks is F₁/mean(F₁) + w·F₂/mean(F₂)."""
    torch.manual_seed(0)
    model = MLP()
    plain = clreg.EWC(model, lam=1.0, estimator="exact")
    norm = clreg.EWC(model, lam=1.0, estimator="exact", normalize="mean")
    online = clreg.OnlineEWC(model, lam=1.0, gamma=0.5, estimator="exact", normalize="mean")
    want: list[torch.Tensor] = []
    online_want: list[torch.Tensor] = []
    for t, w in enumerate([1.0, 3.0]):
        data = classification(t)
        train_a_bit(model, data)
        fisher = clreg.functional.fisher_diagonal(model, data, estimator="exact")
        flat = torch.cat([fisher[n].double().flatten() for n in norm.param_names])
        term = [w * fisher[n].double() / flat.mean() for n in norm.param_names]
        want = term if t == 0 else [a + b for a, b in zip(want, term)]
        online_want = term if t == 0 else [0.5 * a + b for a, b in zip(online_want, term)]
        if t == 0:
            assert abs(float(flat.mean()) - 1.0) > 1e-3  # the plain Fisher's scale is not 1
        for reg in (plain, norm, online):
            reg.consolidate(model, data, clreg.TaskSpec(weight=w))
    for got, ref in zip(norm.importance.tensors, want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-9)
    for got, ref in zip(online.importance.tensors, online_want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="normalize must be one of"):
        clreg.EWC(model, normalize="max")
