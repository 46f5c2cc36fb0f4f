"""The training loop: its schedule, the backbone's learning-rate scale, replay in the same forward
pass, the regularizer's hooks removed afterwards and a diverging loss stopped with a message."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("timm")

import clreg
from clreg.onehead.protocol import Stage, joint_plan
from clreg.onehead.training import Replay, RunSettings, TrainJob, active_tasks, cosine_schedule, train, train_task
from toy_data import ToyData


class _Task:
    """A task as the training loop needs it: a name, training data and a per-sample loss."""

    def __init__(self, name: str, data: torch.utils.data.Dataset) -> None:
        self.name, self.train_data = name, data

    def loss(self, out, y):
        return torch.nn.functional.cross_entropy(out["a"], y, reduction="none")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return {"a": self.head(torch.relu(self.backbone(x)))}


def test_cosine_schedule_with_and_without_warmup() -> None:
    plain, warm = cosine_schedule(200), cosine_schedule(200, warmup_steps=20)
    for s in (0, 1, 19, 20, 57, 100, 199, 200, 250):
        cosine = 0.5 * (1 + math.cos(math.pi * min(s, 200) / 200))
        assert plain(s) == cosine  # no warmup: exactly the cosine factor
        assert warm(s) == pytest.approx(cosine * min(1.0, (s + 1) / 20), abs=1e-15)
    assert warm(0) == pytest.approx(0.05 * 1.0, abs=1e-6)  # (0 + 1) / 20 of the peak, cos(0) = 1
    assert warm(9) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 9 / 200)))
    assert warm(19) == plain(19) and warm(200) == 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        RunSettings(warmup_steps=-1)


def test_backbone_learning_rate_scale_applies_to_backbone_parameters_only():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    task = _Task("a", ToyData(torch.randn(6, 3), 32, 0))
    train(net, TrainJob([task], 5, 0.1, 0), RunSettings(batch_size=8, progress=False, backbone_lr_scale=0.0))
    after = net.state_dict()
    assert torch.equal(before["backbone.weight"], after["backbone.weight"])
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_one_step_with_replay_is_the_gradient_step_of_the_summed_mean_losses():
    """With SGD-like checks on AdamW's first step: the loss of a step is the task's batch mean plus the
    replayed task's mean weighted by ``replay.weight`` (one forward pass over both)."""
    torch.manual_seed(0)
    net = Net()
    w = torch.randn(6, 3)
    task, old = _Task("a", ToyData(w, 16, 0)), _Task("old", ToyData(w, 16, 1))
    buf = clreg.ReplayBuffer(4, seed=0)
    buf.add("old", [old.train_data[i] for i in range(4)])
    seen = []

    def loss_of(out, y):
        seen.append(out["a"].shape[0])
        return torch.nn.functional.cross_entropy(out["a"], y, reduction="none")

    task.loss = old.loss = loss_of
    res = train(net, TrainJob([task], 1, 1e-3, 0, replay=Replay(buf, {"old": old}, per_step=4, weight=0.5)),
                RunSettings(batch_size=8, progress=False))  # fmt: skip
    assert seen == [8, 4] and res.steps == 1 and math.isfinite(res.loss)


def test_the_regularizers_hooks_are_removed_and_a_diverging_loss_stops():
    net = Net()
    ewc = clreg.EWC(net, lam=1.0)
    session = clreg.ContinualSession(ewc)
    task = _Task("a", ToyData(torch.randn(6, 3), 16, 0))
    train(net, TrainJob([task], 2, 1e-3, 0, sessions=[session]), RunSettings(batch_size=8, progress=False))
    assert not ewc.attached and not session.in_task
    task.loss = lambda out, y: out["a"].sum(1) * float("nan")
    with pytest.raises(FloatingPointError, match="the loss became nan at step 0"):
        train(
            net, TrainJob([task], 2, 1e-3, 0, sessions=[session], desc="toy"), RunSettings(batch_size=8, progress=False)
        )
    assert not ewc.attached and not session.in_task


def test_attached_members_add_their_gradient_once_and_lwf_joins_the_loss():
    """One AdamW step with EWC attached and LwF in the loss, against the same step written out: the
    task loss plus LwF's value through autograd, plus λ F (θ − θ*) added to the gradient by hand."""
    torch.manual_seed(0)
    task = _Task("a", ToyData(torch.randn(6, 3), 16, 0))
    run = RunSettings(batch_size=8, progress=False, weight_decay=0.0)
    trained = Net()
    ewc, lwf = clreg.EWC(trained, lam=3.0), clreg.LwF(trained, alpha=1.0)
    data = torch.utils.data.Subset(task.train_data, range(8))
    ewc.consolidate(trained, data, ewc_spec := clreg.TaskSpec(outputs=[clreg.OutputSpec("a", "softmax")]))
    lwf.consolidate(trained, data, ewc_spec)
    reference = Net()
    reference.load_state_dict(trained.state_dict())
    with torch.no_grad():  # move away from the anchor so that EWC's gradient is not zero
        for p in trained.parameters():
            p.add_(0.1)
        for p in reference.parameters():
            p.add_(0.1)
    sessions = [clreg.ContinualSession(ewc), clreg.ContinualSession(lwf)]
    train(trained, TrainJob([task], 1, 1e-2, 0, sessions=sessions), run)
    # the same step by hand: the batch the loop drew (seeded), its loss, LwF's value, EWC's closed form
    from clreg.data import stable_seed
    from clreg.onehead.training import batches

    x, y = next(batches(task.train_data, 8, stable_seed(0, "batches", "a")))
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    out = reference(x)
    loss = task.loss(out, y).float().mean() + lwf(reference, inputs=x, outputs=out)
    loss.backward()
    anchors = dict(zip((n for n, _ in trained.named_parameters()), ewc.anchor.tensors))
    fisher = dict(zip((n for n, _ in trained.named_parameters()), ewc.importance.tensors))
    for n, p in reference.named_parameters():
        p.grad += 3.0 * fisher[n] * (p.detach() - anchors[n])
    opt.step()
    for (n, a), b in zip(trained.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, msg=n)
    with pytest.raises(ValueError, match="smaller than one batch"):
        train_task(
            Net(), _Task("a", ToyData(torch.randn(6, 3), 4, 0)), 1, run=RunSettings(batch_size=8, progress=False)
        )


@given(steps=st.integers(1, 400), fractions=st.lists(st.floats(0, 1), min_size=1, max_size=4))
def test_a_balanced_schedule_gives_each_task_its_batches_spread_evenly(steps, fractions) -> None:
    per_task = [round(f * steps) for f in fractions]
    counts = [0] * len(per_task)
    last = [-1] * len(per_task)
    for s in range(steps):
        for k in active_tasks(s, steps, per_task, len(per_task)):
            counts[k] += 1
            gap = s - last[k]
            assert gap <= -(-steps // max(1, per_task[k])) or last[k] < 0  # never more than ⌈S/b⌉ apart
            last[k] = s
    assert counts == per_task


def test_joint_plans_keep_the_sequences_compute() -> None:
    stages = [Stage("seg", 600), Stage("det", 300), Stage("cls", 400)]
    assert joint_plan(stages, "equal") == (433, None)
    assert joint_plan(stages, "balanced") == (600, [600, 300, 400])
    assert joint_plan(stages, "full") == (600, None)  # every task at least its baseline's steps
    with pytest.raises(ValueError, match="joint schedule"):
        joint_plan(stages, "random")


def test_task_weights_scale_each_tasks_loss() -> None:
    """Two identical tasks with weights 1 and 0 give the one-task step; weights 0.5 and 0.5 too."""
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    runs = {}
    for key, (tasks, weights) in {"one": (1, None), "zero": (2, [1.0, 0.0]), "halves": (2, [0.5, 0.5])}.items():
        torch.manual_seed(0)
        net = Net()
        same = [_Task("a", ToyData(w, 16, 0)) for _ in range(tasks)]
        train(net, TrainJob(same, 3, 1e-2, 0, task_weights=weights), RunSettings(batch_size=8, progress=False))
        runs[key] = [p.detach().clone() for p in net.parameters()]
    for key in ("zero", "halves"):
        for a, b in zip(runs["one"], runs[key]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one value per task"):
        TrainJob([_Task("a", ToyData(w, 16, 0))], 3, 1e-2, 0, task_weights=[1.0, 2.0])


def test_feature_distillation_reads_the_features_of_the_steps_own_forward():
    """One step of ``fd`` (α = 0.5 on the backbone's output) through the one-head loop, against the
    step written out: the task loss plus α · mean over the batch of ‖s − t‖², t from the model as
    it was at consolidation."""
    import copy

    from clreg.bench.parts import PartContext
    from clreg.data import stable_seed
    from clreg.onehead.methods import Method
    from clreg.onehead.training import batches

    torch.manual_seed(0)
    task = _Task("a", ToyData(torch.randn(6, 3), 16, 0))
    trained = Net()
    built = Method.parse("fd", {"fd.alpha": 0.5}).build(trained, context=PartContext(feature_modules=("backbone",)))
    sessions = [clreg.ContinualSession(m) for m in built.members.values()]
    sessions[0].consolidate(trained, None)
    teacher = copy.deepcopy(trained)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1)
    reference = copy.deepcopy(trained)
    run = RunSettings(batch_size=8, progress=False, weight_decay=0.0)
    train(trained, TrainJob([task], 1, 1e-2, 0, sessions=sessions, watch=built.watch), run)
    x, y = next(batches(task.train_data, 8, stable_seed(0, "batches", "a")))
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    out = reference(x)
    s, t = reference.backbone(x), teacher.backbone(x).detach()
    loss = task.loss(out, y).float().mean() + 0.5 * (s - t).pow(2).sum(1).mean()
    loss.backward()
    opt.step()
    for (n, a), b in zip(trained.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, msg=n)
