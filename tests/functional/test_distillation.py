"""The distillation losses against hand computations per output kind."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clreg.functional import regression_distillation, sigmoid_distillation, softmax_distillation


def test_softmax_distillation_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    T = 2.0
    ref = 0.0
    for i in range(2):
        q = [math.exp(v / T) for v in t[i].tolist()]
        p = [math.exp(v / T) for v in s[i].tolist()]
        q = [v / sum(q) for v in q]
        p = [v / sum(p) for v in p]
        ref += sum(qc * math.log(qc / pc) for qc, pc in zip(q, p)) / 2
    assert softmax_distillation(s, t, T).item() == pytest.approx(T * T * ref, rel=1e-5)
    assert softmax_distillation(s, t, T, t_squared=False).item() == pytest.approx(ref, rel=1e-5)
    assert softmax_distillation(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    # channels: the old task's two classes only
    sub = softmax_distillation(s, t, T, channels=[0, 2])
    assert sub.item() == pytest.approx(softmax_distillation(s[:, [0, 2]], t[:, [0, 2]], T).item())
    # the gradient equals that of the cross-entropy to the teacher (KL differs by a constant)
    s1 = s.clone().requires_grad_()
    g_kl = torch.autograd.grad(softmax_distillation(s1, t, T), s1)[0]
    ce = -(F.softmax(t / T, 1) * F.log_softmax(s1 / T, 1)).sum(1).mean() * T * T
    torch.testing.assert_close(g_kl, torch.autograd.grad(ce, s1)[0])


def test_dense_softmax_distillation_averages_locations() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    flat_s = s.permute(0, 2, 3, 1).reshape(-1, 3)
    flat_t = t.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(softmax_distillation(s, t, 1.5), softmax_distillation(flat_s, flat_t, 1.5))


def test_sigmoid_distillation_by_hand() -> None:
    s = torch.tensor([[0.3, -1.0]]).reshape(1, 2, 1, 1)
    t = torch.tensor([[1.0, 0.5]]).reshape(1, 2, 1, 1)
    ref = 0.0
    for sv, tv in zip([0.3, -1.0], [1.0, 0.5]):
        p, q = 1 / (1 + math.exp(-sv)), 1 / (1 + math.exp(-tv))
        ref += q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    assert sigmoid_distillation(s, t).item() == pytest.approx(ref, rel=1e-5)
    assert sigmoid_distillation(t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert sigmoid_distillation(s, t, channels=[1]).item() == pytest.approx(
        (lambda p, q: q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)))(
            1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-0.5))
        ),
        rel=1e-5,
    )


def test_regression_distillation_by_hand() -> None:
    s = torch.tensor([[[1.0], [2.0]], [[0.0], [1.0]]])  # (B=2, C=2, L=1)
    t = torch.tensor([[[0.0], [0.0]], [[0.0], [3.0]]])
    # per location: Σ_c (s − t)²: sample 0 → 1 + 4 = 5, sample 1 → 0 + 4 = 4
    assert regression_distillation(s, t).item() == pytest.approx(4.5)
    assert regression_distillation(s, t, norm="l1").item() == pytest.approx((3 + 2) / 2)
    w = torch.tensor([[1.0], [0.0]])  # (B, L): the background sample does not count
    assert regression_distillation(s, t, weight=w).item() == pytest.approx(5.0)
    assert regression_distillation(s, t, weight=torch.zeros(2, 1)).item() == 0.0
    with pytest.raises(ValueError, match="does not fit"):
        regression_distillation(s, t, weight=torch.ones(3, 2))
    with pytest.raises(ValueError, match="differ in shape"):
        regression_distillation(s, t[:1])
