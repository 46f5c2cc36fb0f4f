"""LwF against hand computations per output kind; MAS against a per-sample loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import clreg
from clreg import OutputSpec, TaskSpec
from clreg.functional import mas_importance, regression_distillation, sigmoid_distillation, softmax_distillation
from models import MLP, MultiHead, per_sample_grads


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


def test_lwf_module_on_several_outputs_matches_hand_sum() -> None:
    torch.manual_seed(0)
    model = MultiHead()
    objectness = lambda out: torch.sigmoid(out["det"]["heatmap"]).amax(1)  # noqa: E731
    spec = TaskSpec(
        outputs=[
            OutputSpec(select="seg", kind="softmax", channels=[0, 1, 2]),
            OutputSpec(select="det.heatmap", kind="sigmoid"),
            OutputSpec(select=("det", "box"), kind="regression", weight=objectness),
        ]
    )
    lwf = clreg.LwF(model, temperature=2.0, alpha=0.7)
    x = torch.randn(3, 3, 6, 6)
    model.eval()  # the teacher runs in eval mode: compare with an eval-mode student
    lwf.consolidate(model, None, spec)
    out = model(x)
    assert lwf(model, inputs=x, outputs=out).item() == pytest.approx(0.0, abs=1e-6)
    # move the student; the teacher stays the consolidated model, run in eval mode
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = model(x)
    got = lwf(model, inputs=x, outputs=out)
    t_out = lwf.teacher(model, x)
    ref = 0.7 * (
        softmax_distillation(out["seg"], t_out["seg"], 2.0, channels=[0, 1, 2])
        + sigmoid_distillation(out["det"]["heatmap"], t_out["det"]["heatmap"])
        + regression_distillation(out["det"]["box"], t_out["det"]["box"], weight=objectness(t_out))
    )
    torch.testing.assert_close(got, ref)
    assert got.item() > 0
    g = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    assert any(gi is not None and gi.abs().sum() > 0 for gi in g)
    model.train()  # the teacher runs in eval mode and puts every module back as it was
    lwf(model, inputs=x, outputs=model(x))
    assert all(m.training for m in model.modules())


def test_lwf_teacher_is_model_at_consolidation_in_eval_mode() -> None:
    torch.manual_seed(1)
    model = MultiHead()
    lwf = clreg.LwF(model, outputs=OutputSpec(select="cls"))
    model.train()
    x = torch.randn(4, 3, 5, 5)
    model(x)  # BN running statistics move
    lwf.consolidate(model)
    snapshot = MultiHead()
    snapshot.load_state_dict(model.state_dict())
    snapshot.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
        model(x)
    torch.testing.assert_close(lwf.teacher(model, x)["cls"], snapshot(x)["cls"])
    assert model.training


def test_lwf_needs_inputs_and_checks_selectors() -> None:
    model = MultiHead()
    lwf = clreg.LwF(model, outputs=OutputSpec(select="cls"))
    lwf.consolidate(model)
    with pytest.raises(ValueError, match="needs the batch's inputs"):
        lwf(model)
    bad = clreg.LwF(model, outputs=OutputSpec(select="logits"))
    bad.consolidate(model)
    with pytest.raises(ValueError, match="key 'logits' not found"):
        bad(model, inputs=torch.randn(1, 3, 4, 4))
    not_a_tensor = clreg.LwF(model, outputs=OutputSpec(select="det"))
    not_a_tensor.consolidate(model)
    with pytest.raises(ValueError, match="gave dict"):
        not_a_tensor(model, inputs=torch.randn(1, 3, 4, 4))


def test_lwf_on_tuple_outputs() -> None:
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    model = Two()
    lwf = clreg.LwF(model, outputs=[OutputSpec(select=1)])
    lwf.consolidate(model)
    with torch.no_grad():
        model.b.weight.add_(1.0)
    x = torch.randn(5, 3)
    out = model(x)
    torch.testing.assert_close(
        lwf(model, inputs=x, outputs=out), softmax_distillation(out[1], lwf.teacher(model, x)[1], 2.0)
    )


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
