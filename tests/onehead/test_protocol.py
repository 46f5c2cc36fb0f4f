"""The run protocol is generic: another model and task list through the same units; each stage's
learning rate and warmup reach the training loop; every unit starts from the seed's one init."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import clreg

pytest.importorskip("timm")

from clreg import OutputSpec, TaskSpec
from clreg.onehead import protocol
from clreg.onehead.cli import main
from clreg.onehead.methods import Method
from clreg.onehead.metrics import ClassificationMetric
from clreg.onehead.profiles import PROFILES
from clreg.onehead.protocol import SeedRun, Stage, method_stages
from clreg.onehead.store import UnitStore, evaluation_record
from clreg.onehead.training import RunSettings
from toy_data import ToyData


class ToyTask:
    """A classification task over one output of a two-head model, following the Task protocol."""

    metric_name, chance = "Top-1", 1 / 3

    def __init__(self, name: str, w: torch.Tensor, k: int) -> None:
        self.name = name
        self.train_data, self.test = ToyData(w, 64, 10 + k), ToyData(w, 200, 20 + k)
        self.fit_data = None
        self.spec = TaskSpec(outputs=[OutputSpec(select=name, kind="softmax")])

    def loss(self, out, y):
        return torch.nn.functional.cross_entropy(out[self.name], y, reduction="none")

    def evaluate(self, model, device="cpu"):
        metric = ClassificationMetric(3)
        with torch.no_grad():
            metric.update(model(self.test.x)[self.name], self.test.y, ids=list(range(len(self.test))))
        return metric

    def extras(self, metric):
        return {}

    def prepare(self, model):
        pass


class TwoHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 16)
        self.a, self.b = torch.nn.Linear(16, 3), torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"a": self.a(h), "b": self.b(h)}


def test_the_protocol_runs_another_model_and_task_list(tmp_path):
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(6, 3, generator=g) for _ in range(2)]
    tasks = {n: ToyTask(n, w, k) for k, (n, w) in enumerate(zip("ab", ws))}
    stages = [Stage("a", 60, 0.02), Stage("b", 60, 0.02)]
    run = SeedRun(TwoHead, tasks, stages, RunSettings(batch_size=16, resamples=100, progress=False),
                  UnitStore(tmp_path, 0, log_line=lambda s: None))  # fmt: skip
    naive = method_stages(run, Method.parse("naive"))
    lwf = method_stages(run, Method.parse("lwf", {"lwf.alpha": 10.0}))
    assert naive[0].evals["a"].value > 0.7  # task a learned in stage 1
    # both runs start stage 2 from the same stage-1 state; LwF keeps more of task a
    assert lwf[1].evals["a"].value >= naive[1].evals["a"].value
    rec = evaluation_record(tasks["a"].evaluate(TwoHead()), 100)
    assert rec.boot.shape == (100,) and rec.lo <= rec.value <= rec.hi + 1e-12
    assert math.isfinite(rec.value)


def test_every_unit_starts_from_the_seeds_one_initialisation(tmp_path):
    tasks = {"a": ToyTask("a", torch.randn(6, 3), 0)}
    run = SeedRun(TwoHead, tasks, [Stage("a", 1)], RunSettings(progress=False), UnitStore(tmp_path, 3, print))
    first, second = run.fresh_model("joint"), run.fresh_model("single/b")
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))
    with pytest.raises(ValueError, match="unknown tasks"):
        SeedRun(TwoHead, tasks, [Stage("z", 1)], RunSettings(), UnitStore(tmp_path, 0))
    with pytest.raises(ValueError, match="one stage only"):
        SeedRun(TwoHead, tasks, [Stage("a", 1), Stage("a", 1)], RunSettings(), UnitStore(tmp_path, 0))


def test_each_stages_learning_rate_and_warmup_reach_the_training_loop(cache_env, tmp_path, monkeypatch) -> None:
    """A stage's learning rate and warmup reach the run settings its task is trained with (through
    the command line on the tiny profile); a stage without its own warmup keeps the run's."""
    seen = []

    class Stop(Exception):
        pass

    def train(model, job, run):
        seen.append((job.desc, job.lr, run.warmup_steps))
        raise Stop

    monkeypatch.setitem(
        PROFILES,
        "tiny",
        replace(
            PROFILES["tiny"], stage_warmup={"seg": 2, "det": 3, "cls": 4}, stage_lr={"seg": 0.5, "det": 0.6, "cls": 0.7}
        ),
    )
    monkeypatch.setattr(protocol, "train", train)
    with pytest.raises(Stop):
        main(["--profile", "tiny", "--out", str(tmp_path / "o"), "--quiet"])
    assert seen == [("stage 1 (seg)", 0.5, 2)]
    run = SeedRun(TwoHead, {"det": None}, [], RunSettings(warmup_steps=5), UnitStore(tmp_path, 0))
    assert run.settings_for(Stage("det", 10, warmup_steps=3)).warmup_steps == 3
    assert run.settings_for(Stage("det", 10)).warmup_steps == 5


def test_per_stage_values_reach_the_regularizer_of_their_stage(tmp_path, monkeypatch):
    """``ewc.lam@3`` is EWC's λ while stage 3 trains; stage 2 keeps ``ewc.lam``; a profile's stage
    setting applies where the method sets none."""
    tasks = {n: ToyTask(n, torch.randn(6, 3, generator=torch.Generator().manual_seed(k)), k) for k, n in
             enumerate("abc")}  # fmt: skip
    seen = {}
    real_train = protocol.train

    def train(model, job, run):
        for session in job.sessions:
            if isinstance(session.regularizer, clreg.EWC):  # stage 1's session is SI's path tracker
                seen[job.desc] = session.regularizer.lam
        return real_train(model, job, run)

    monkeypatch.setattr(protocol, "train", train)
    stages = [Stage("a", 4, 0.01), Stage("b", 4, 0.01, settings={"ewc.lam": 7.0}), Stage("c", 4, 0.01)]
    run = SeedRun(TwoHead3, tasks, stages, RunSettings(batch_size=8, resamples=10, progress=False),
                  UnitStore(tmp_path, 0, log_line=lambda s: None))  # fmt: skip
    method_stages(run, Method.parse("ewc", {"ewc.lam": 2.0, "ewc.lam@3": 5.0}))
    assert seen == {"ewc stage 2 (b)": 7.0, "ewc stage 3 (c)": 5.0}


class TwoHead3(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 16)
        self.a, self.b, self.c = (torch.nn.Linear(16, 3) for _ in range(3))

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"a": self.a(h), "b": self.b(h), "c": self.c(h)}


def test_the_baselines_learning_rate_is_the_stages_own_and_names_its_units(tmp_path):
    """A stage's baseline_lr trains its baseline (and, for stage 1, every method's first stage) and
    names the unit; a method's later stages keep the method's own learning rate."""
    tasks = {"a": ToyTask("a", torch.randn(6, 3), 0), "b": ToyTask("b", torch.randn(6, 3), 1)}
    stages = [Stage("a", 2, baseline_lr=0.05), Stage("b", 2, baseline_lr=0.01)]
    run = SeedRun(TwoHead, tasks, stages, RunSettings(batch_size=8, resamples=10, progress=False),
                  UnitStore(tmp_path, 0, log_line=lambda s: None), baseline_lr=0.3)  # fmt: skip
    m = Method.parse("naive", {"lr": 0.002})
    assert run.lr(stages[0], None) == 0.05 and run.lr(stages[1], m) == 0.002
    assert run.lr(Stage("b", 2), None) == 0.3 and run.lr(Stage("b", 2, lr=0.7), m) == 0.7
    method_stages(run, m)
    names = sorted(p.name for p in (tmp_path / "state" / "seed0").glob("*.pt"))
    assert names[1] == "stage1@lr0.05.pt" and names[0].startswith("naive@")
    assert m.key([{}, {}], start="stage1@lr0.05") != m.key([{}, {}])  # another first stage: other units
