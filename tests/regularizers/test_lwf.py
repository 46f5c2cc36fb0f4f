"""The LwF module: the teacher, several outputs, selectors and errors, against hand sums."""

from __future__ import annotations

import pytest
import torch

import clreg
from clreg import OutputSpec, TaskSpec
from clreg.functional import regression_distillation, sigmoid_distillation, softmax_distillation
from models import MultiHead


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
