"""The Hugging Face Trainer integration: the penalty's gradient on a step equals the plain loop's (after
the Trainer's clipping, once per optimizer step under gradient accumulation, in fp32 and bf16 autocast,
unscaled under a GradScaler); a run killed in task 2 and resumed from its checkpoint continues with the
checkpoint's penalties; LwF through ContinualTrainer is scaled like the task loss under accumulation, with
a per-batch-mean loss and with a loss normalised over the accumulated tokens; the members' values reach
the logs; and what the Trainer does around ``zero_grad`` and the reporters' order, asserted so a change
is noticed."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import clreg  # noqa: E402
from clreg.integrations.transformers import (  # noqa: E402
    CHECKPOINT_NAME,
    ContinualCallback,
    ContinualTrainer,
    keyword_batches,
)

SPEC = clreg.TaskSpec(clreg.OutputSpec(select="logits"))
LR = 0.1


class Net(nn.Module):
    """A classifier the Trainer can run: ``forward(x, labels=None) -> {"loss", "logits"}``; it records
    whether it was in train mode on the calls without labels (consolidation, not the Trainer's steps)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.unlabelled_modes: list[bool] = []

    def forward(self, x, labels=None):
        logits = self.body(x)
        if labels is None:
            self.unlabelled_modes.append(self.training)
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class TokenSumNet(Net):
    """A model that normalises its loss over the accumulated step's labels (``num_items_in_batch``, as
    transformers' language models do): it takes ``**kwargs``, so the Trainer counts the labels that are not
    -100 over the micro-batches, passes the count and does not divide the loss by the accumulation steps."""

    def forward(self, x, labels=None, **kwargs):
        n = kwargs.get("num_items_in_batch")
        if labels is None or n is None:
            return super().forward(x, labels)
        logits = self.body(x)
        return {"loss": F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / n, "logits": logits}


def tensors(t: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(n, 4, generator=g)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(t))
    return x, (x @ w).argmax(1)


class DictData(Dataset):
    """The Trainer's form: items ``{"x": ..., "labels": ...}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def train_data(t: int, n: int = 32) -> DictData:
    return DictData(*tensors(t, n))


def clreg_data(t: int, n: int = 32) -> TensorDataset:
    """clreg's form of the same task: ``(x, y)`` items."""
    return TensorDataset(*tensors(t, n))


def args(path, **kw) -> TrainingArguments:
    opts = dict(output_dir=str(path), use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                disable_tqdm=True, max_steps=3, per_device_train_batch_size=8, learning_rate=LR, seed=0,
                dataloader_num_workers=0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                train_sampling_strategy="sequential")  # fmt: skip
    return TrainingArguments(**{**opts, **kw})


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().float().clone() for p in model.parameters()]


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in model.parameters()]


class StepProbe(TrainerCallback):
    """Each optimizer step seen from outside: the gradient in ``on_pre_optimizer_step`` (after the
    Trainer's clipping), the gradient the optimizer uses (a step pre-hook registered after clreg's, so
    after the penalty), the parameters around the step, and ``p.grad`` in ``on_step_end``. Put it after the
    ContinualCallback in the callbacks."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw) -> None:
        self.before_step, self.in_step, self.params_before, self.params_after, self.at_step_end = [], [], [], [], []
        self.handle = optimizer.optimizer.register_step_pre_hook(lambda *a: self.in_step.append(grads(model)))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw) -> None:
        self.before_step.append(grads(model))
        self.params_before.append(params(model))

    def on_optimizer_step(self, args, state, control, model=None, **kw) -> None:
        self.params_after.append(params(model))

    def on_step_end(self, args, state, control, model=None, **kw) -> None:
        self.at_step_end.append([p.grad for p in model.parameters()])

    def on_train_end(self, args, state, control, **kw) -> None:
        self.handle.remove()


class RecordingTrainer(Trainer):
    """A Trainer that keeps each micro-batch it trains on."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", [])
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = 1e-5, atol: float = 1e-7) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def autograd(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return [g.float() for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)]


def norm(gs: list[torch.Tensor]) -> float:
    return float(torch.cat([g.flatten() for g in gs]).norm())


def task_1(net: Net, continual: ContinualCallback, tmp_path, trainer_cls=Trainer, **kw) -> None:
    """Three steps on task 0 (``kw``: TrainingArguments), consolidated on its data."""
    extra = {"continual": continual} if issubclass(trainer_cls, ContinualTrainer) else {}
    trainer_cls(net, args(tmp_path / "task1", **kw), train_dataset=train_data(0), callbacks=[continual],
                **extra).train()  # fmt: skip


# -- the attached penalties ------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_penalty_gradient_on_task_2s_first_step_is_the_plain_loops(tmp_path, precision) -> None:
    """The optimizer's gradient is the task loss's plus EWC's closed form, added inside the step (not
    there yet in on_pre_optimizer_step), and SGD moves by −lr times it; the consolidation ran the model in
    eval mode and left it in train mode. bf16: the Trainer autocasts the forward on the CPU (Accelerate's
    wrapper stays on the model's forward, so the Fisher pass is autocast too, and so is the reference)."""
    kw = {"bf16": True} if precision == "bf16" else {}
    net = Net()
    ewc = clreg.EWC(net, lam=50.0, estimator="exact")
    continual = ContinualCallback(ewc, data=clreg_data(0), spec=SPEC)
    task_1(net, continual, tmp_path, **kw)
    assert continual.tasks == 1 and int(ewc.n_tasks) == 1
    state = copy.deepcopy(ewc.state_dict())
    assert net.unlabelled_modes and not any(net.unlabelled_modes) and net.training  # eval in the Fisher pass only
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2)  # away from the anchor: a penalty gradient that is really there
    before = copy.deepcopy(net)
    probe = StepProbe()
    Trainer(net, args(tmp_path / "task2", max_steps=2, **kw), train_dataset=train_data(1),
            callbacks=[continual, probe]).train()  # fmt: skip
    assert continual.tasks == 2 and int(ewc.n_tasks) == 2 and len(probe.in_step) == 2

    ref = clreg.EWC(before, lam=50.0, estimator="exact")
    ref.load_state_dict(state)
    x, y = tensors(1)
    x, y = x[:8], y[:8]  # sequential sampling: the first batch
    task = autograd(F.cross_entropy(before(x)["logits"].float(), y), before)
    penalty = autograd(ref(before), before)
    assert norm(penalty) > 0.1
    tol = dict(rtol=1e-5, atol=1e-7) if precision == "fp32" else dict(rtol=2e-3, atol=1e-5)
    close(probe.before_step[0], task, **tol)
    close(probe.in_step[0], [t + p for t, p in zip(task, penalty)], **tol)
    moved = [a - b for a, b in zip(probe.params_after[0], probe.params_before[0])]
    close(moved, [-LR * g for g in probe.in_step[0]], rtol=1e-4, atol=1e-7)


def ewc_after_task_1(tmp_path):
    """EWC consolidated on task 1 by the callback, the model moved off its anchor: (model, EWC, callback,
    a copy of the model, a copy of EWC's state, a fresh StepProbe)."""
    net = Net()
    ewc = clreg.EWC(net, lam=50.0, estimator="exact")
    continual = ContinualCallback(ewc, data=clreg_data(0), spec=SPEC)
    task_1(net, continual, tmp_path)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2)
    return net, ewc, continual, copy.deepcopy(net), copy.deepcopy(ewc.state_dict()), StepProbe()


def test_with_gradient_accumulation_the_penalty_is_added_once_per_optimizer_step(tmp_path) -> None:
    net, _, continual, before, state, probe = ewc_after_task_1(tmp_path)
    Trainer(net, args(tmp_path / "task2", max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=4),
            train_dataset=train_data(1, n=8), callbacks=[continual, probe]).train()  # fmt: skip
    assert len(probe.in_step) == 1  # one optimizer step of four micro-batches, one pre-hook call
    ref = clreg.EWC(before, lam=50.0, estimator="exact")
    ref.load_state_dict(state)
    x, y = tensors(1, n=8)
    task = autograd(sum(F.cross_entropy(before(xs)["logits"], ys) / 4 for xs, ys in zip(x.split(2), y.split(2))),
                    before)  # fmt: skip
    penalty = autograd(ref(before), before)
    assert norm(penalty) > 0.1
    close(probe.before_step[0], task)
    close(probe.in_step[0], [t + p for t, p in zip(task, penalty)])


def test_the_trainers_clipping_bounds_the_task_gradient_only(tmp_path) -> None:
    """max_grad_norm clips in the Trainer's loop before optimizer.step(); the penalty is added inside
    the step, unclipped (clreg's plain attached mode; the Lightning callback clips it with the rest)."""
    net, _, continual, before, state, probe = ewc_after_task_1(tmp_path)
    Trainer(net, args(tmp_path / "task2", max_steps=1, max_grad_norm=0.05), train_dataset=train_data(1),
            callbacks=[continual, probe]).train()  # fmt: skip
    ref = clreg.EWC(before, lam=50.0, estimator="exact")
    ref.load_state_dict(state)
    x, y = tensors(1)
    task = autograd(F.cross_entropy(before(x[:8])["logits"], y[:8]), before)
    penalty = autograd(ref(before), before)
    assert norm(task) > 0.05 and norm(penalty) > 0.1
    clipped = [t * 0.05 / (norm(task) + 1e-6) for t in task]  # torch's clip_grad_norm_: max / (norm + 1e-6)
    close(probe.before_step[0], clipped, rtol=1e-4)
    close(probe.in_step[0], [c + p for c, p in zip(clipped, penalty)], rtol=1e-4)


def test_under_a_grad_scaler_the_penalty_is_added_to_unscaled_gradients(tmp_path) -> None:
    """fp16 on a GPU: Accelerate's AcceleratedOptimizer.step is scaler.step (unscale, then the torch
    optimizer's step, whose pre-hook adds the penalty). On the CPU the Trainer's fp16 has no scaler, so
    the wrapper is built here as Accelerate builds it, with a CPU GradScaler; an overflow skips the step,
    penalty included."""
    from accelerate.optimizer import AcceleratedOptimizer

    net = Net()
    ewc = clreg.EWC(net, lam=50.0, estimator="exact")
    ewc.consolidate(net, clreg_data(0), SPEC)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2)
    trainer = Trainer(net, args(tmp_path))  # Accelerate's state, which AcceleratedOptimizer reads
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    wrapped = AcceleratedOptimizer(torch.optim.SGD(net.parameters(), lr=LR), device_placement=False, scaler=scaler)
    continual = ContinualCallback(ewc, data=clreg_data(0), spec=SPEC)
    continual.on_train_begin(trainer.args, trainer.state, trainer.control, model=net, optimizer=wrapped)
    assert ewc.attached
    before = copy.deepcopy(net)
    ref = clreg.EWC(before, lam=50.0, estimator="exact")
    ref.load_state_dict(ewc.state_dict())
    x, y = tensors(1)
    scaler.scale(F.cross_entropy(net(x, y)["logits"], y)).backward()
    wrapped.step()
    want = [a + b for a, b in zip(autograd(F.cross_entropy(before(x)["logits"], y), before),
                                   autograd(ref(before), before))]  # fmt: skip
    close([b - a for a, b in zip(params(before), params(net))], [-LR * w for w in want], rtol=1e-4, atol=1e-7)
    net.zero_grad()
    scaler.scale(F.cross_entropy(net(x, y)["logits"], y) * float("inf")).backward()
    stuck = params(net)
    wrapped.step()
    assert wrapped.step_was_skipped
    close(params(net), stuck, rtol=0, atol=0)


def test_on_step_end_sees_no_gradients(tmp_path) -> None:
    """The Trainer calls model.zero_grad() (set_to_none) after optimizer.step() and before on_step_end:
    a callback reading p.grad there reads None; the gradient is there in on_pre_optimizer_step."""
    net = Net()
    probe = StepProbe()
    continual = ContinualCallback(clreg.EWC(net, lam=1.0), data=clreg_data(0), spec=SPEC)
    Trainer(net, args(tmp_path, max_steps=2), train_dataset=train_data(0), callbacks=[continual, probe]).train()
    assert len(probe.at_step_end) == 2
    assert all(g is None for step in probe.at_step_end for g in step)
    assert all(float(g.abs().sum()) > 0 for step in probe.before_step for g in step)


class StopAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kw) -> None:
        control.should_training_stop = state.global_step >= 1


def test_a_run_a_callback_stops_ends_the_task(tmp_path) -> None:
    """should_training_stop (early stopping) is a normal end: the Trainer calls on_train_end."""
    net = Net()
    ewc = clreg.EWC(net, lam=1.0, estimator="exact")
    continual = ContinualCallback(ewc, data=clreg_data(0), spec=SPEC)
    trainer = Trainer(net, args(tmp_path, max_steps=5), train_dataset=train_data(0), callbacks=[continual, StopAt()])
    trainer.train()
    assert trainer.state.global_step == 1 and continual.tasks == 1 and int(ewc.n_tasks) == 1 and not ewc.attached


# -- checkpoints ------------------------------------------------------------------------------------
class Killed(RuntimeError):
    pass


class KillAt(TrainerCallback):
    """Crashes the run when step ``n + 1`` begins (the step-``n`` checkpoint is written by then)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_begin(self, args, state, control, **kw) -> None:
        if state.global_step >= self.n:
            raise Killed


def ewc_and_si(net: nn.Module) -> clreg.Compose:
    return clreg.Compose(clreg.EWC(net, lam=20.0, estimator="exact"), clreg.SI(net, c=0.5))


def test_a_run_killed_in_task_2_resumes_from_its_checkpoint_with_the_checkpoints_penalties(tmp_path) -> None:
    """Task 2 crashes after two steps (no consolidation: the Trainer calls on_train_end only at a normal
    end). A fresh model and callback (a new process) resume from checkpoint-2: the callback reads clreg.pt
    there (EWC's Fisher and anchor, SI's importance and path, the task count), the first resumed step's
    gradient is the task loss's plus those penalties', and the run ends the task. ContinualTrainer tells the
    callback where the checkpoint is when it lies outside output_dir; the crashed callback, still attached
    to the dead run's optimizer, trains again. A checkpoint without clreg.pt is a ValueError naming it."""
    net = Net()
    continual = ContinualCallback(ewc_and_si(net), data=lambda task, model: clreg_data(task), spec=SPEC)
    task_1(net, continual, tmp_path)
    crashed = Trainer(net, args(tmp_path / "task2", max_steps=4, save_strategy="steps", save_steps=2),
                      train_dataset=train_data(1), callbacks=[continual, KillAt(2)])  # fmt: skip
    with pytest.raises(Killed):
        crashed.train()
    assert continual.tasks == 1 and int(continual.regularizer["ewc"].n_tasks) == 1
    folder = tmp_path / "task2" / "checkpoint-2"
    saved = torch.load(folder / CHECKPOINT_NAME, weights_only=True)
    assert set(saved) == {"regularizer", "tasks"} and saved["tasks"] == 1

    at_kill = Net()
    at_kill.load_state_dict(load_file(folder / "model.safetensors"))
    ref = ewc_and_si(at_kill)
    ref.load_state_dict(saved["regularizer"])
    assert int(ref["si"].steps) == 2

    def resume(callback, trainer_cls=RecordingTrainer, output_dir=tmp_path / "task2", **kw):
        fresh = Net()
        probe = StepProbe()
        trainer = trainer_cls(fresh, args(output_dir, max_steps=4, save_steps=2), train_dataset=train_data(1),
                              callbacks=[callback(fresh), probe], **kw)  # fmt: skip
        trainer.train(resume_from_checkpoint=str(folder))
        return trainer, probe

    resumed = None

    def fresh_callback(model):
        nonlocal resumed
        resumed = ContinualCallback(ewc_and_si(model), data=lambda task, m: clreg_data(task), spec=SPEC)
        return resumed

    trainer, probe = resume(fresh_callback)
    assert resumed.tasks == 2 and int(resumed.regularizer["ewc"].n_tasks) == 2
    assert len(probe.in_step) == 2  # steps 3 and 4
    x, y = trainer.seen[0]["x"], trainer.seen[0]["labels"]
    torch.testing.assert_close(x, tensors(1)[0][16:24])  # the data skipped to the third batch
    penalty = autograd(ref(at_kill), at_kill)
    assert norm(penalty) > 1e-3
    want = autograd(F.cross_entropy(at_kill(x)["logits"], y) + ref(at_kill), at_kill)
    close(probe.in_step[0], want)

    # the crashed callback, through ContinualTrainer, from an output_dir that does not hold the checkpoint
    _, probe = resume(lambda model: continual, trainer_cls=ContinualTrainer, output_dir=tmp_path / "elsewhere",
                      continual=continual)  # fmt: skip
    assert continual.tasks == 2
    close(probe.in_step[0], want)

    os.remove(folder / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=r"no clreg state at .*checkpoint-2.clreg\.pt"):
        resume(lambda model: ContinualCallback(ewc_and_si(model), data=clreg_data(0), spec=SPEC))


# -- LwF through ContinualTrainer --------------------------------------------------------------------
@pytest.mark.parametrize("loss_over_tokens", [False, True], ids=["batch-mean", "token-sum"])
@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_lwf_in_compute_loss_is_the_mean_over_the_micro_batches(tmp_path, accumulate, loss_over_tokens) -> None:
    """The optimizer step's gradient: the task loss's as the Trainer scales it (a per-micro-batch mean
    divided by the accumulation steps, or a sum over the step's labels divided by their count), plus the
    mean over the micro-batches of LwF's per-micro-batch term (in on_pre_optimizer_step), plus EWC's
    closed form (added inside the step)."""
    net = TokenSumNet() if loss_over_tokens else Net()
    reg = clreg.Compose(clreg.EWC(net, lam=5.0, estimator="exact"), clreg.LwF(net, temperature=2.0))
    continual = ContinualCallback(reg, data=lambda task, model: clreg_data(task), spec=SPEC)
    task_1(net, continual, tmp_path, trainer_cls=ContinualTrainer)
    assert continual.tasks == 1 and int(reg["lwf"].n_tasks) == 1
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    before = copy.deepcopy(net)
    state = copy.deepcopy(reg.state_dict())
    x, y = tensors(1, n=8)
    if loss_over_tokens:
        y = y.clone()
        y[[1, 2, 5]] = -100  # micro-batches with different numbers of labels
    probe = StepProbe()
    trainer = ContinualTrainer(net, args(tmp_path / "task2", max_steps=1, per_device_train_batch_size=8 // accumulate,
                                         gradient_accumulation_steps=accumulate),
                               train_dataset=DictData(x, y), callbacks=[continual, probe], continual=continual)  # fmt: skip
    assert trainer.model_accepts_loss_kwargs is loss_over_tokens
    trainer.train()
    assert len(probe.in_step) == 1

    ref = clreg.Compose(clreg.EWC(before, lam=5.0, estimator="exact"), clreg.LwF(before, temperature=2.0))
    ref.load_state_dict(state)
    task = lwf = 0.0
    for xs, ys in zip(x.split(8 // accumulate), y.split(8 // accumulate)):
        out = before(xs)
        if loss_over_tokens:
            task = task + F.cross_entropy(out["logits"], ys, ignore_index=-100, reduction="sum") / (y != -100).sum()
        else:
            task = task + F.cross_entropy(out["logits"], ys) / accumulate
        lwf = lwf + ref["lwf"](before, inputs=xs, outputs=out) / accumulate
    lwf_grad = autograd(lwf, before)
    assert norm(lwf_grad) > 1e-2
    want = autograd(task + lwf, before)
    close(probe.before_step[0], want, rtol=1e-4, atol=1e-6)
    ewc = autograd(ref["ewc"](before), before)
    close(probe.in_step[0], [w + e for w, e in zip(want, ewc)], rtol=1e-4, atol=1e-6)


def test_with_attach_false_every_member_goes_through_the_loss_and_is_clipped(tmp_path) -> None:
    """attach=False: EWC's value is added in compute_loss (once per step under accumulation: divided like
    the loss), so the Trainer's clip bounds it too; SI tracks its path."""
    net = Net()
    reg = clreg.Compose(clreg.EWC(net, lam=50.0, estimator="exact"), clreg.SI(net, c=0.5))
    continual = ContinualCallback(reg, data=clreg_data(0), spec=SPEC, attach=False)
    task_1(net, continual, tmp_path, trainer_cls=ContinualTrainer)
    assert continual.tasks == 1 and int(reg["si"].n_tasks) == 1  # SI had a path: it was tracked
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2)
    before = copy.deepcopy(net)
    state = copy.deepcopy(reg.state_dict())
    probe = StepProbe()
    ContinualTrainer(net, args(tmp_path / "task2", max_steps=1, per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, max_grad_norm=0.5),
                     train_dataset=train_data(1, n=8), callbacks=[continual, probe], continual=continual).train()  # fmt: skip
    ref = clreg.Compose(clreg.EWC(before, lam=50.0, estimator="exact"), clreg.SI(before, c=0.5))
    ref.load_state_dict(state)
    x, y = tensors(1, n=8)
    total = autograd(sum(F.cross_entropy(before(xs)["logits"], ys) / 2 for xs, ys in zip(x.split(4), y.split(4)))
                     + ref(before), before)  # fmt: skip
    assert norm(total) > 0.5
    clipped = [t * 0.5 / (norm(total) + 1e-6) for t in total]
    close(probe.before_step[0], clipped, rtol=1e-4)
    close(probe.in_step[0], clipped, rtol=1e-4)  # nothing added inside the step


# -- logging and errors -------------------------------------------------------------------------------
class LogProbe(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []
        self.params: list[list[torch.Tensor]] = []

    def on_log(self, args, state, control, logs=None, model=None, **kw) -> None:
        if "loss" in logs:
            self.logs.append(dict(logs))
            self.params.append(params(model))


def test_the_members_values_reach_the_logs(tmp_path) -> None:
    """clreg/<name> in the logs at every logging step, the value at the parameters after the step. The
    Trainer calls the reporters (report_to) before the callbacks given to it: ContinualTrainer adds the
    values in log(), so a callback before the ContinualCallback (where a reporter is) sees them; with a
    plain Trainer only the callbacks after it and state.log_history do."""
    net = Net()
    reg = clreg.Compose(clreg.EWC(net, lam=50.0, estimator="exact"), clreg.LwF(net, temperature=2.0))
    continual = ContinualCallback(reg, data=clreg_data(0), spec=SPEC)
    task_1(net, continual, tmp_path, trainer_cls=ContinualTrainer)
    state = copy.deepcopy(reg.state_dict())
    early, late = LogProbe(), LogProbe()
    ContinualTrainer(net, args(tmp_path / "task2", max_steps=2, logging_strategy="steps", logging_steps=1),
                     train_dataset=train_data(1), callbacks=[early, continual, late], continual=continual).train()  # fmt: skip
    assert len(early.logs) == len(late.logs) == 2
    for probe in (early, late):
        assert {"clreg/ewc", "clreg/lwf"} <= set(probe.logs[0])
    assert early.logs[1]["clreg/lwf"] > 0  # the student has moved from its teacher after one step
    at = Net()
    with torch.no_grad():
        for p, v in zip(at.parameters(), early.params[1]):
            p.copy_(v)
    ref = clreg.EWC(at, lam=50.0, estimator="exact")
    ref.load_state_dict({k.removeprefix("members.0."): v for k, v in state.items() if k.startswith("members.0.")})
    assert early.logs[1]["clreg/ewc"] == pytest.approx(float(ref(at).detach()), rel=1e-5)
    assert early.logs[1]["clreg/ewc"] > 0

    net2 = Net()
    plain = ContinualCallback(clreg.EWC(net2, lam=50.0, estimator="exact"), data=clreg_data(0), spec=SPEC)
    early, late = LogProbe(), LogProbe()
    trainer = Trainer(net2, args(tmp_path / "plain", max_steps=2, logging_strategy="steps", logging_steps=1),
                      train_dataset=train_data(0), callbacks=[early, plain, late])  # fmt: skip
    trainer.train()
    assert not any(k.startswith("clreg/") for k in early.logs[0])
    assert "clreg/ewc" in late.logs[0]
    assert all("clreg/ewc" in entry for entry in trainer.state.log_history if "loss" in entry)


def test_errors_name_the_problem(tmp_path) -> None:
    net = Net()
    with pytest.raises(TypeError, match="clreg regularizer or Compose"):
        ContinualCallback(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ContinualCallback"):
        ContinualTrainer(net, args(tmp_path), continual=object())
    with pytest.raises(TypeError, match="spec must be a TaskSpec"):
        ContinualCallback(clreg.EWC(net), spec="logits")

    other = nn.Sequential(nn.Linear(4, 5))  # built on another model than the Trainer's
    continual = ContinualCallback(clreg.EWC(other), data=clreg_data(0), spec=SPEC)
    with pytest.raises(ValueError, match="build the regularizer on the model you give the Trainer"):
        Trainer(net, args(tmp_path), train_dataset=train_data(0), callbacks=[continual]).train()

    ewc = clreg.EWC(net, params=["body.0.weight"])
    net.body[0].weight.requires_grad_(False)  # frozen after the regularizer was built
    continual = ContinualCallback(ewc, data=clreg_data(0), spec=SPEC)
    with pytest.raises(ValueError, match="holds none of the EWC's parameters"):
        Trainer(net, args(tmp_path), train_dataset=train_data(0), callbacks=[continual]).train()
    net.body[0].weight.requires_grad_(True)
    continual = ContinualCallback(clreg.EWC(net), data=clreg_data(0), spec=SPEC)
    net.body[0].weight.requires_grad_(False)
    warns = pytest.warns(UserWarning, match="1 of the EWC's parameters are not in the Trainer's optimizer")
    with warns, pytest.raises(Killed):  # stopped before the task's end: the warning is the point here
        Trainer(net, args(tmp_path), train_dataset=train_data(0), callbacks=[continual, KillAt(1)]).train()
    net.body[0].weight.requires_grad_(True)

    lwf = ContinualCallback(clreg.LwF(net), data=clreg_data(0), spec=SPEC)
    with pytest.warns(UserWarning, match=r"\['lwf'\] have no closed-form gradient .*ContinualTrainer"):
        Trainer(net, args(tmp_path, max_steps=1), train_dataset=train_data(0), callbacks=[lwf]).train()


def test_keyword_batches_and_the_default_data_are_the_trainers_loader(tmp_path) -> None:
    """Without data=, the task consolidates on the Trainer's training loader, its dict batches given to
    the model as keywords: the Fisher equals the one on the same samples in clreg's form."""
    (inputs, labels), *_ = keyword_batches([{"x": torch.ones(2, 4), "labels": torch.zeros(2), "mask": torch.ones(2)}])
    assert isinstance(inputs, clreg.KeywordInputs) and sorted(inputs) == ["mask", "x"] and labels.shape == (2,)
    net = Net()
    ewc = clreg.EWC(net, lam=1.0, estimator="exact")
    continual = ContinualCallback(ewc, spec=SPEC)
    Trainer(net, args(tmp_path, max_steps=2), train_dataset=train_data(0), callbacks=[continual]).train()
    ref = clreg.EWC(net, lam=1.0, estimator="exact")
    ref.consolidate(net, clreg_data(0), SPEC)
    close(ewc.importance.tensors, ref.importance.tensors, rtol=1e-5, atol=1e-9)
    assert float(sum(t.sum() for t in ewc.importance.tensors)) > 0


# -- a transformers model -----------------------------------------------------------------------------
def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config)


class TokenData(Dataset):
    """A task's sequences, ``{"input_ids", "attention_mask", "labels"}`` (the Trainer's form)."""

    def __init__(self, t: int, n: int = 8, length: int = 8) -> None:
        g = torch.Generator().manual_seed(t)
        start = torch.randint(0, 64, (n, 1), generator=g)
        self.ids = (start + (t + 1) * torch.arange(length)) % 64  # task t: the next token is t + 1 ahead

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_a_causal_lm_through_continual_trainer_with_accumulation(tmp_path) -> None:
    """LlamaForCausalLM from a config: EWC on the Trainer's loader (causal_lm_batches) and LwF on the token
    logits. The model normalises its loss over the step's tokens (num_items_in_batch), so the Trainer does
    not divide it; the step's gradient is that loss's, plus LwF's mean over the two micro-batches, plus
    EWC's closed form."""
    from clreg.integrations.causal_lm import causal_lm_batches, causal_lm_spec

    net = tiny_llama()
    reg = clreg.Compose(clreg.EWC(net, lam=100.0, estimator="batched"), clreg.LwF(net, temperature=2.0))
    continual = ContinualCallback(reg, spec=causal_lm_spec(), batches=causal_lm_batches)
    ContinualTrainer(net, args(tmp_path / "task1", max_steps=2, per_device_train_batch_size=4), continual=continual,
                     train_dataset=TokenData(0)).train()  # fmt: skip
    assert continual.tasks == 1 and float(sum(t.sum() for t in reg["ewc"].importance.tensors)) > 0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    before = copy.deepcopy(net)
    state = copy.deepcopy(reg.state_dict())
    probe = StepProbe()
    trainer = ContinualTrainer(net, args(tmp_path / "task2", max_steps=1, per_device_train_batch_size=4,
                                         gradient_accumulation_steps=2),
                               train_dataset=TokenData(1), callbacks=[continual, probe], continual=continual)  # fmt: skip
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    assert continual.tasks == 2

    ref = clreg.Compose(clreg.EWC(before, lam=100.0, estimator="batched"), clreg.LwF(before, temperature=2.0))
    ref.load_state_dict(state)
    data = TokenData(1)
    ids = data.ids
    n_tokens = ids[:, 1:].numel()
    loss = 0.0
    for mb in ids.split(4):
        out = before(input_ids=mb, attention_mask=torch.ones_like(mb), labels=mb, num_items_in_batch=n_tokens)
        inputs = clreg.KeywordInputs(input_ids=mb, attention_mask=torch.ones_like(mb))
        loss = loss + out.loss + ref["lwf"](before, inputs=inputs, outputs=out) / 2
    assert float(ref["lwf"].last_value) > 0
    want = autograd(loss, before)
    close(probe.before_step[0], want, rtol=1e-4, atol=1e-6)
    ewc = autograd(ref["ewc"](before), before)
    assert norm(ewc) > 1e-3
    close(probe.in_step[0], [w + e for w, e in zip(want, ewc)], rtol=1e-4, atol=1e-6)
