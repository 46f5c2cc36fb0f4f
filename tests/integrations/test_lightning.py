"""The Lightning callback: the penalty's gradient on a step equals the plain loop's, once per optimizer
step under gradient accumulation, in 32-true and bf16-mixed; it is clipped with the rest; a fit killed
in task 2 and resumed from its checkpoint continues with the same penalties, and mid-epoch with a
resumable loader as the uninterrupted run (losses, state, weights); two DDP processes give the
single-process state."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

import clreg  # noqa: E402
from clreg.integrations.lightning import ContinualLearning  # noqa: E402


def task_data(t: int, n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(n, 4, generator=g)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(t))
    return TensorDataset(x, (x @ w).argmax(1))


class Net(L.LightningModule):
    def __init__(self, lwf: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.continual: ContinualLearning | None = None
        self.lwf = lwf
        self.losses: list[float] = []

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, i):
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out, y)
        if self.lwf:
            loss = loss + self.continual.penalty(self, x, out)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GradProbe(L.Callback):
    """Each optimizer step's gradient as the optimizer sees it (after the callbacks before it)."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append([p.grad.detach().float().clone() for p in pl_module.parameters()])


def trainer(callbacks, **kw) -> L.Trainer:
    opts = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                accelerator="cpu", devices=1, deterministic=True)  # fmt: skip
    return L.Trainer(callbacks=callbacks, **{**opts, **kw})


def loader(t: int, batch: int = 8) -> DataLoader:
    return DataLoader(task_data(t), batch_size=batch, shuffle=False)


def fit_two_tasks(net: Net, reg, *, precision="32-true", accumulate=1, clip=None, steps2=2):
    continual = ContinualLearning(reg, data=task_data(0), log_every_n_steps=None)
    net.continual = continual
    trainer([continual], max_steps=3, precision=precision).fit(net, loader(0))
    before = copy.deepcopy(net)
    probe = GradProbe()
    trainer([continual, probe], max_steps=steps2, precision=precision, accumulate_grad_batches=accumulate,
            gradient_clip_val=clip).fit(net, loader(1, batch=8 // accumulate if accumulate > 1 else 8))  # fmt: skip
    return before, probe, continual


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_penalty_gradient_on_task_2s_first_step_is_the_plain_loops(precision) -> None:
    net = Net()
    ewc = clreg.EWC(net, lam=50.0, estimator="exact")
    before, probe, continual = fit_two_tasks(net, ewc, precision=precision)
    assert continual.tasks == 2 and int(ewc.n_tasks) == 2
    # the plain loop on the model as task 2 began: the task-2 loss's gradient plus EWC's closed form
    ref = clreg.EWC(before, lam=50.0, estimator="exact")
    ref.consolidate(before, task_data(0))
    x, y = next(iter(loader(1)))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = F.cross_entropy(before(x), y)
    loss = loss.float() + ref(before)
    grads = torch.autograd.grad(loss, list(before.parameters()))
    for got, want in zip(probe.grads[0], grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_with_gradient_accumulation_the_penalty_is_added_once_per_optimizer_step() -> None:
    net = Net()
    ewc = clreg.EWC(net, lam=50.0, estimator="exact")
    before, probe, _ = fit_two_tasks(net, ewc, accumulate=4, steps2=1)
    assert len(probe.grads) == 1  # one optimizer step of 4 micro-batches
    ref = clreg.EWC(before, lam=50.0, estimator="exact")
    ref.consolidate(before, task_data(0))
    x, y = next(iter(loader(1, batch=8)))
    params = list(before.parameters())
    task = [torch.zeros_like(p) for p in params]
    for xs, ys in zip(x.split(2), y.split(2)):  # Lightning divides each micro-batch's loss by 4
        for acc, g in zip(task, torch.autograd.grad(F.cross_entropy(before(xs), ys) / 4, params)):
            acc += g
    penalty = torch.autograd.grad(ref(before), params)
    for got, t, p in zip(probe.grads[0], task, penalty):
        torch.testing.assert_close(got, t + p, rtol=1e-4, atol=1e-6)


def test_lightnings_gradient_clipping_sees_the_penalty() -> None:
    """The penalty is added in on_before_optimizer_step, before Lightning clips: the clipped gradient
    is the task's plus the penalty's, scaled to the clip norm (clreg's plain attached mode adds it
    after a user's clipping instead)."""
    net = Net()
    ewc = clreg.EWC(net, lam=5e3, estimator="exact")
    continual = ContinualLearning(ewc, data=task_data(0), log_every_n_steps=None)
    net.continual = continual
    trainer([continual], max_steps=3).fit(net, loader(0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)  # far from the anchor: a large penalty gradient
    before = copy.deepcopy(net)
    net.configure_optimizers = lambda: torch.optim.SGD(net.parameters(), lr=0.0)  # look, do not move
    seen = []

    class AfterStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, i):
            seen.append(torch.cat([p.grad.flatten() for p in pl_module.parameters()]))

    trainer([continual, AfterStep()], max_steps=1, gradient_clip_val=0.25).fit(net, loader(1))
    x, y = next(iter(loader(1)))
    ref = clreg.EWC(before, lam=5e3, estimator="exact")
    ref.load_state_dict(ewc.state_dict())
    total = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(before(x), y) + ref(before),
                                                                list(before.parameters()))])  # fmt: skip
    assert total.norm() > 1.0
    torch.testing.assert_close(seen[0], total * 0.25 / total.norm(), rtol=1e-4, atol=1e-7)


class Killed(RuntimeError):
    pass


class KillAfter(L.Callback):
    """Stops the fit as a crash would, after ``n`` optimizer steps (when the next batch starts:
    Lightning runs checkpoint callbacks last, so the step's checkpoint is written by then)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_batch_start(self, trainer, pl_module, batch, i) -> None:
        if trainer.global_step >= self.n:
            raise Killed


class BatchProbe(L.Callback):
    def __init__(self) -> None:
        self.batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, i) -> None:
        self.batches.append([t.clone() for t in batch])


def ewc_and_si(net: Net) -> clreg.Compose:
    return clreg.Compose(clreg.EWC(net, lam=20.0, estimator="exact"), clreg.SI(net, c=0.5))


def test_a_fit_killed_in_task_2_resumes_from_its_checkpoint_with_the_same_penalties(tmp_path) -> None:
    """Task 2 crashes after four steps (no consolidation), a new process resumes
    from the checkpoint written at step 4: the callback's state is the checkpoint's (EWC's Fisher and
    anchor, SI's path so far, the task count), the first resumed step's gradient is the task loss's
    plus those penalties' closed form, and the resumed fit ends the task."""
    L.seed_everything(0, workers=True)
    net = Net()
    continual = ContinualLearning(ewc_and_si(net), data=task_data(0), log_every_n_steps=None)
    trainer([continual], max_steps=3).fit(net, loader(0))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    t = trainer([continual, ckpt, KillAfter(4)], max_steps=8, enable_checkpointing=True)
    with pytest.raises(Killed):
        t.fit(net, loader(1))
    assert t.interrupted and continual.tasks == 1  # not consolidated: the task is not over
    at_kill = copy.deepcopy(continual.regularizer.state_dict())
    (path,) = tmp_path.glob("*step=4.ckpt")

    fresh = Net()  # a new process builds everything afresh
    resumed = ContinualLearning(ewc_and_si(fresh), data=task_data(0), log_every_n_steps=None)
    grads, batches = GradProbe(), BatchProbe()
    checkpoint = torch.load(path, weights_only=False)
    model_at_kill = Net()
    model_at_kill.load_state_dict(checkpoint["state_dict"])
    trainer([resumed, grads, batches], max_steps=8).fit(fresh, loader(1), ckpt_path=str(path))

    assert resumed.tasks == 2 and int(resumed.regularizer.members[0].n_tasks) == 2
    ref = ewc_and_si(model_at_kill)
    ref.load_state_dict(at_kill)
    x, y = batches.batches[0]
    params = list(model_at_kill.parameters())
    want = torch.autograd.grad(F.cross_entropy(model_at_kill(x), y) + ref(model_at_kill), params)
    penalty = torch.autograd.grad(ref(model_at_kill), params)
    assert sum(float(g.norm()) for g in penalty) > 1e-3  # a penalty that is really there
    for got, w in zip(grads.grads[0], want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
    assert len(grads.grads) == 4  # steps 5 to 8


class ResumableLoader:
    """Batches of a dataset in a seeded order per epoch that Lightning can resume mid-epoch: its
    ``state_dict`` (epoch, batches given) goes into the checkpoint and back."""

    def __init__(self, data: TensorDataset, batch: int = 8) -> None:
        self.data, self.batch, self.epoch, self.start = data, batch, 0, 0

    def __len__(self) -> int:
        return len(self.data) // self.batch

    def __iter__(self):
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.epoch))
        start, self.start = self.start, 0
        for i in range(start, len(self)):
            self.given = i + 1
            yield self.data[order[i * self.batch : (i + 1) * self.batch]]
        self.epoch, self.given = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "given": getattr(self, "given", 0)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start = state["epoch"], state["given"]


def test_a_fit_killed_mid_epoch_in_task_2_continues_as_the_uninterrupted_run(tmp_path) -> None:
    """Task 2 (two epochs of four steps, a resumable loader) crashes after step 6, in its second
    epoch; a new process resumes from the step-6 checkpoint (written during task 2, after task 1's
    consolidation): its task-2 losses, the regularizer's state after task 2 (EWC's Fisher and anchor,
    SI's Ω from the whole path) and the weights are the uninterrupted run's."""

    def task_1() -> tuple[Net, ContinualLearning]:
        L.seed_everything(0, workers=True)
        net = Net()
        continual = ContinualLearning(ewc_and_si(net), data=task_data(0), log_every_n_steps=None)
        trainer([continual], max_steps=3).fit(net, loader(0))
        net.losses = []
        return net, continual

    whole_net, whole = task_1()
    trainer([whole], max_steps=8).fit(whole_net, ResumableLoader(task_data(1)))

    cut_net, cut = task_1()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(Killed):
        trainer([cut, ckpt, KillAfter(6)], max_steps=8, enable_checkpointing=True).fit(
            cut_net, ResumableLoader(task_data(1))
        )
    fresh = Net()
    resumed = ContinualLearning(ewc_and_si(fresh), data=task_data(0), log_every_n_steps=None)
    (path,) = tmp_path.glob("*step=6.ckpt")
    trainer([resumed], max_steps=8).fit(fresh, ResumableLoader(task_data(1)), ckpt_path=str(path))

    assert len(whole_net.losses) == 8 and len(cut_net.losses) == 6 and len(fresh.losses) == 2
    assert cut_net.losses + fresh.losses == pytest.approx(whole_net.losses, rel=1e-6, abs=1e-7)
    assert whole.tasks == resumed.tasks == 2
    a, b = whole.regularizer.state_dict(), resumed.regularizer.state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-7, msg=k)
    for p, q in zip(whole_net.parameters(), fresh.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_lwf_goes_in_the_training_step_and_members_are_logged(tmp_path) -> None:
    net = Net(lwf=True)
    reg = clreg.Compose(clreg.EWC(net, lam=1.0), clreg.LwF(net, temperature=2.0))
    continual = ContinualLearning(reg, data=task_data(0), log_every_n_steps=1)
    net.continual = continual
    trainer([continual], max_steps=2).fit(net, loader(0))
    logged = {}

    class Logged(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, i):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer([continual, Logged()], max_steps=2).fit(net, loader(1))
    assert set(logged) >= {"clreg/ewc", "clreg/lwf"} and logged["clreg/lwf"] > 0
    with pytest.raises(TypeError, match="clreg regularizer or Compose"):
        ContinualLearning(torch.nn.Linear(2, 2))


_DDP_SCRIPT = """
import json, sys, torch, lightning as L
sys.path.insert(0, sys.argv[2])
from test_lightning import Net, ContinualLearning, loader, task_data, clreg
L.seed_everything(0)
net = Net()
continual = ContinualLearning(clreg.EWC(net, lam=1.0, estimator="exact"), data=task_data(0), log_every_n_steps=None)
t = L.Trainer(max_steps=2, strategy=sys.argv[3], accelerator="cpu", devices=int(sys.argv[4]), logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
t.fit(net, loader(0))
if t.global_rank == 0:
    torch.save(continual.regularizer.state_dict(), sys.argv[1])
"""


@pytest.mark.slow
def test_two_ddp_processes_give_the_single_process_fisher(tmp_path) -> None:
    """strategy="ddp" on two CPU processes (Lightning relaunches the script): each rank consolidates
    on its share of the Dataset and the sums are all-reduced, so the state equals one process's."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    here = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([here, str(Path(here).parent)])}
    states = {}
    for strategy, devices in (("ddp", 2), ("auto", 1)):
        out = tmp_path / f"{strategy}.pt"
        r = subprocess.run([sys.executable, str(script), str(out), here, strategy, str(devices)], env=env,
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        states[strategy] = torch.load(out, weights_only=True)
    for k, v in states["auto"].items():
        if isinstance(v, torch.Tensor) and "importance" in k:
            torch.testing.assert_close(states["ddp"][k], v, rtol=1e-5, atol=1e-8, msg=k)
    assert json.dumps(sorted(states["ddp"])) == json.dumps(sorted(states["auto"]))


def test_a_factory_builds_the_regularizer_when_the_first_fit_starts_and_takes_a_checkpoints_state() -> None:
    built = []

    def make(module):
        built.append(module)
        return clreg.EWC(module, lam=1.0, estimator="exact")

    net = Net()
    continual = ContinualLearning(make, data=task_data(0), log_every_n_steps=None)
    assert continual.tasks == 0 and continual.state_dict() == {}
    with pytest.raises(ValueError, match="does not exist yet"):
        _ = continual.session
    trainer([continual], max_steps=2).fit(net, loader(0))
    assert built == [net] and continual.tasks == 1
    saved = continual.state_dict()
    # a fresh callback given the checkpoint's state before its factory ran continues from it
    again = ContinualLearning(make, data=task_data(1), log_every_n_steps=None)
    again.load_state_dict(saved)
    assert again.tasks == 1
    trainer([again], max_steps=2).fit(net, loader(1))
    assert again.tasks == 2 and len(built) == 2
    reference = clreg.EWC(net, lam=1.0, estimator="exact")
    reference.load_state_dict(saved["regularizer"])  # task 1's state: the new one holds it plus task 2
    assert int(again.regularizer.n_tasks) == int(reference.n_tasks) + 1
    with pytest.raises(TypeError, match="must return a clreg regularizer"):
        trainer([ContinualLearning(lambda m: "ewc")], max_steps=1).fit(Net(), loader(0))
    with pytest.raises(TypeError, match="or a callable module -> regularizer"):
        ContinualLearning(3)
