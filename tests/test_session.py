"""ContinualSession: the per-task lifecycle equals the same loop written with the regularizer's own
calls; consolidation runs in eval mode with the modes restored; the state round-trips; misuse is named."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import clreg
from clreg.session import ContinualSession, eval_mode


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def task_data(task: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(100 + task)
    return torch.utils.data.TensorDataset(torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g))


def make_reg(model: nn.Module) -> clreg.Compose:
    return clreg.Compose(clreg.EWC(model, lam=5.0, estimator="exact"), clreg.SI(model, c=2.0))


def batches(task: int):
    return torch.utils.data.DataLoader(task_data(task), batch_size=4)


def by_session(attach: bool, hook: bool) -> tuple[nn.Module, clreg.Compose, ContinualSession]:
    model = make_model()
    reg = make_reg(model)
    session = ContinualSession(reg, attach=attach)
    for task in range(2):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        session.begin_task(opt, hook=hook, model=model)
        for x, y in batches(task):
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y) + session.penalty(model, x, out)
            loss.backward()
            if not hook:
                session.pre_step()
            opt.step()
        session.end_task(model, task_data(task), clreg.TaskSpec())
    assert session.tasks == 2 and not session.in_task
    return model, reg, session


def by_hand(attach: bool, hook: bool) -> tuple[nn.Module, clreg.Compose]:
    model = make_model()
    reg = make_reg(model)
    for task in range(2):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if attach:
            reg.attach(opt, hook=hook)
        else:
            reg["si"].track(opt)
        for x, y in batches(task):
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            if not attach:
                loss = loss + reg(model, inputs=x, outputs=out)
            loss.backward()
            if attach and not hook:
                reg.pre_step()
            opt.step()
        reg.detach()
        model.eval()
        reg.consolidate(model, task_data(task), clreg.TaskSpec())
        model.train()
    return model, reg


@pytest.mark.parametrize(("attach", "hook"), [(True, True), (True, False), (False, True)])
def test_the_session_is_the_loop_written_by_hand(attach: bool, hook: bool) -> None:
    ours, our_reg, _ = by_session(attach, hook)
    ref, ref_reg = by_hand(attach, hook)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    for member in ("ewc", "si"):  # both consolidated something (SI: a tracked path)
        assert float(sum(t.abs().sum() for t in our_reg[member].importance.tensors)) > 0, member
    a, b = our_reg.state_dict(), ref_reg.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
    assert not our_reg["ewc"].attached and not our_reg["si"].attached
    # the same two tasks without the penalties end elsewhere: the comparison above can fail
    plain = make_model()
    for task in range(2):
        opt = torch.optim.SGD(plain.parameters(), lr=0.1)
        for x, y in batches(task):
            opt.zero_grad()
            nn.functional.cross_entropy(plain(x), y).backward()
            opt.step()
    assert not torch.allclose(plain[0].weight, ours[0].weight, atol=1e-6)


def test_values_are_each_members_value() -> None:
    model, reg, session = by_session(attach=False, hook=True)
    values = session.values()  # not attached: each member's value in the last penalty
    assert sorted(values) == ["ewc", "si"]
    assert torch.equal(values["ewc"], reg["ewc"].last_value) and torch.equal(values["si"], reg["si"].last_value)
    assert float(values["ewc"]) > 0
    session = ContinualSession(reg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session.begin_task(opt, model=model)
    values = session.values()
    with torch.no_grad():
        assert torch.equal(values["ewc"], reg["ewc"](model)) and float(values["ewc"]) > 0
    session.abort_task()


class Probe(clreg.Regularizer):
    """Runs the model on the task's inputs in its consolidation and records what it saw."""

    def forward(self, model, inputs=None, outputs=None):
        return self._zero()

    def consolidate(self, model, data=None, spec=None):
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.outs = [model(data), model(data)]
        self._bump_tasks()


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_end_task_consolidates_in_eval_mode_and_restores_the_modes() -> None:
    model = bn_model()
    probe = Probe(model)
    x = torch.randn(16, 4) * 3 + 1
    model.train()
    model[3].eval()  # a mixed mode, to be restored as it was
    before = {n: m.training for n, m in model.named_modules()}
    stats = (model[1].running_mean.clone(), model[1].running_var.clone(), int(model[1].num_batches_tracked))
    session = ContinualSession(probe)
    session.begin_task(model=model)  # nothing to attach: no optimizer needed
    session.end_task(model, x)
    assert not any(probe.modes.values())  # every submodule in eval mode
    assert torch.equal(probe.outs[0], probe.outs[1])  # dropout off
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].running_var, stats[1])
    assert int(model[1].num_batches_tracked) == stats[2]
    assert {n: m.training for n, m in model.named_modules()} == before
    assert session.tasks == 1 and int(probe.n_tasks) == 1
    # the same consolidation in train mode moves the statistics: the assertions above can fail
    probe.consolidate(model, x)
    assert not torch.equal(model[1].running_mean, stats[0])
    assert not torch.equal(probe.outs[0], probe.outs[1])


def test_consolidate_between_tasks_is_end_task_for_a_resumed_run() -> None:
    """A run that saved its model after training and consolidates when it starts again: the same eval
    mode and count as end_task, refused while a task is under way."""
    model = bn_model()
    probe = Probe(model)
    x = torch.randn(16, 4) * 3 + 1
    model.train()
    session = ContinualSession(probe)
    session.consolidate(model, x, spec=lambda k: clreg.TaskSpec(weight=float(k + 1)))
    assert not any(probe.modes.values()) and torch.equal(probe.outs[0], probe.outs[1])
    assert model.training and session.tasks == 1 and int(probe.n_tasks) == 1
    session.begin_task(model=model)
    with pytest.raises(ValueError, match="consolidate during a task"):
        session.consolidate(model, x)
    with pytest.raises(TypeError, match="expects the model"):
        ContinualSession(Probe(model)).consolidate("model", x)


def test_eval_mode_restores_the_modes_after_an_error() -> None:
    model = bn_model()
    model[2].eval()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not model.training and not model[1].training
        raise RuntimeError("boom")
    assert model.training and model[1].training and not model[2].training


def test_the_state_round_trips_into_a_fresh_session(tmp_path) -> None:
    model, reg, session = by_session(attach=True, hook=True)
    path = tmp_path / "session.pt"
    torch.save(session.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) == {"regularizer", "tasks"} and state["tasks"] == 2
    fresh = ContinualSession(make_reg(model))
    fresh.load_state_dict(state)
    assert fresh.tasks == 2 and int(fresh.regularizer["ewc"].n_tasks) == 2
    for k, v in reg.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(fresh.regularizer.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(fresh.regularizer(model), reg(model)) and float(reg(model)) > 0
    # the layout the Lightning and Hugging Face callbacks wrote before they ran on a session
    old = {"regularizer": copy.deepcopy(reg.state_dict()), "tasks": 2}
    again = ContinualSession(make_reg(model))
    again.load_state_dict(old)
    assert again.tasks == 2
    with pytest.raises(ValueError, match="not a ContinualSession state"):
        again.load_state_dict(reg.state_dict())
    with pytest.raises(ValueError, match=">= 0"):
        again.load_state_dict({"regularizer": reg.state_dict(), "tasks": -1})


def test_the_callbacks_states_load_into_a_session(tmp_path) -> None:
    lightning = pytest.importorskip("clreg.integrations.lightning")
    model, reg, _ = by_session(attach=True, hook=True)
    callback = lightning.ContinualLearning(make_reg(model))
    callback.load_state_dict({"regularizer": reg.state_dict(), "tasks": 2})
    assert callback.tasks == 2 and callback.state_dict()["tasks"] == 2
    session = ContinualSession(make_reg(model))
    session.load_state_dict(callback.state_dict())
    assert session.tasks == 2
    hf = pytest.importorskip("clreg.integrations.transformers")
    path = tmp_path / hf.CHECKPOINT_NAME
    torch.save({"regularizer": reg.state_dict(), "tasks": 2}, path)  # clreg.pt as the callback wrote it
    callback = hf.ContinualCallback(make_reg(model))
    callback._load(str(path), step=4)
    assert callback.tasks == 2 and set(callback.state_dict()) == {"regularizer", "tasks"}
    with torch.no_grad():
        assert torch.equal(callback.regularizer(model), reg(model))


def test_misuse_is_named() -> None:
    model = make_model()
    with pytest.raises(TypeError, match="clreg regularizer or Compose"):
        ContinualSession(nn.Linear(2, 2))
    session = ContinualSession(make_reg(model))
    with pytest.raises(ValueError, match="end_task without begin_task"):
        session.end_task(model, task_data(0))
    with pytest.raises(ValueError, match="pre_step outside a task"):
        session.pre_step()
    with pytest.raises(ValueError, match="needs the optimizer"):
        session.begin_task(model=model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session.begin_task(opt, model=model)
    with pytest.raises(ValueError, match="begin_task called twice"):
        session.begin_task(opt)
    with pytest.raises(ValueError, match="hook=False"):
        session.pre_step()
    with pytest.raises(ValueError, match="during a task"):
        session.load_state_dict(session.state_dict())
    with pytest.raises(TypeError, match="spec must be a TaskSpec"):
        session.end_task(model, task_data(0), spec="logits")
    assert session.tasks == 0 and not session.regularizer["ewc"].attached
    with pytest.raises(ValueError, match="needs the model"):
        ContinualSession(clreg.LwF(model)).penalty()
    other = nn.Sequential(nn.Linear(4, 5))
    with pytest.raises(ValueError):
        ContinualSession(clreg.EWC(other)).begin_task(opt, model=model)
    frozen = make_model()
    ewc = clreg.EWC(frozen, params=["0.weight"])
    only_last = torch.optim.SGD(frozen[2].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="holds none of the EWC's parameters"):
        ContinualSession(ewc).begin_task(only_last, model=frozen)
    with pytest.warns(UserWarning, match="2 of the EWC's parameters are not in the optimizer"):
        ContinualSession(clreg.EWC(frozen)).begin_task(torch.optim.SGD(frozen[0].parameters(), lr=0.1), model=frozen)


def test_a_spec_may_be_a_callable_of_the_task_index() -> None:
    model = make_model()
    seen = []

    def spec(task: int) -> clreg.TaskSpec:
        seen.append(task)
        return clreg.TaskSpec()

    session = ContinualSession(clreg.EWC(model, lam=1.0, estimator="exact"))
    for task in range(2):
        session.begin_task(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
        session.end_task(model, task_data(task), spec)
    assert seen == [0, 1] and session.tasks == 2
