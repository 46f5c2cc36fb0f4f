"""One run of a scenario: a method (or a reference) trained through a stage list on one seed, scored
on every task after every stage.

Per stage k (task :math:`T_k`, a fresh Adam at the stage's learning rate, its multi-tensor
implementation, a linear warmup; from the second stage on, the task's ``prepare`` hook first): each step
draws a shuffled batch of :math:`T_k`'s training data and minimises

.. math:: L_{T_k}(\\text{batch}) + \\sum_{\\text{past } t} w_r\\, L_t(\\text{replayed}_t) + \\text{penalty},

the replay term with a replay part (``replay.per_step`` samples split over the past tasks, each past
task's loss weighted ``replay.weight``), the penalty from each regularizer member through
:class:`~clreg.ContinualSession` (closed-form members attached to the optimizer, LwF in the loss). At the
stage's end each member consolidates :math:`T_k`'s training data with its task spec (in eval mode), the
replay buffer stores :math:`T_k`'s samples, and every task of the run is scored on the split: the row k
of the accuracy matrix :math:`R_{k,j}`. The last stage is not consolidated (nothing trains after it).

References: ``joint`` trains one model on every task at once (each step one batch of each task, the
losses summed) for as many steps as the longest stage, so every task gets at least its own stage's
steps of its own data; a task's ``baseline`` trains it alone, from the same initialisation, for its
stage's steps.

Example:
    >>> from clreg.bench import make_scenario, run
    >>> scenario = make_scenario("digits", setting="class", epochs=1)
    >>> result = run(scenario, "ewc", scenario.stages()[:2], seed=0, settings={"ewc.lam": 10.0})
    >>> len(result.matrix), len(result.matrix[0])
    (2, 2)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..regularizers import Compose, Regularizer
from ..replay import ReplayBuffer
from ..session import ContinualSession, eval_mode
from .checkpoint import save_model
from .method import Method
from .parts import PartContext
from .scenario import Scenario, Stage, Task, check_split
from .stats import Metric

__all__ = ["REFERENCES", "RunResult", "effective_settings", "run", "run_baseline"]

REFERENCES = ("joint",)
"""Reference runs that are not methods: ``joint`` (every task at once)."""


@dataclass
class RunResult:
    """A run's scores: ``matrix[k][j]`` task j's metric after stage k (one row for ``joint``), the
    metrics of the last row (for the bootstrap), the effective settings and the wall time."""

    method: str
    seed: int
    split: str
    tasks: list[str]
    matrix: list[list[float]]
    final: list[Metric]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _batches(data: Dataset, batch_size: int, seed: int) -> Iterator[Any]:
    """Shuffled batches of ``data`` without end (a new permutation per pass, seeded); a TensorDataset is
    indexed directly (one ``randperm`` per pass), any other Dataset goes through a DataLoader."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(data, TensorDataset):
        n = len(data)
        while True:
            order = torch.randperm(n, generator=generator)
            for i in range(0, n, batch_size):
                yield tuple(t[order[i : i + batch_size]] for t in data.tensors)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    while True:
        yield from loader


def _optimizer(model: nn.Module, stage: Stage, lr: float) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    warmup = stage.warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return opt, schedule


def _detached(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {k: _detached(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detached(v) for v in tree)
    return tree


def _scores(model: nn.Module, tasks: Sequence[Task], split: str) -> list[Metric]:
    with eval_mode(model), torch.no_grad():
        return [t.evaluate(model, split) for t in tasks]


def _replay_loss(
    model: nn.Module, buffer: ReplayBuffer, per_step: int, weight: float, tasks: Mapping[str, Task]
) -> Tensor:
    drawn = buffer.sample(per_step)
    return sum(weight * tasks[name].loss(model(x), y) for name, (x, y) in drawn.items())  # type: ignore[return-value]


class _Members:
    """A method's regularizers, one :class:`~clreg.ContinualSession` each (so each consolidates with its
    own spec), and its replay buffer."""

    def __init__(self, method: Method, model: nn.Module, seed: int, context: PartContext) -> None:
        self.method = method
        self.regs: dict[str, Regularizer] = {}
        for part in method.parts:
            reg = part.regularizer(model, seed, context)
            if reg is not None:
                self.regs[part.name] = reg
        if self.regs:  # one ledger, as in one Compose: SI's path leaves out what every member added
            Compose(*self.regs.values())
        self.sessions = {name: ContinualSession(reg) for name, reg in self.regs.items()}
        replay = method.replay
        self.buffer = replay.replay_buffer(seed) if replay is not None else None

    def begin(self, optimizer: torch.optim.Optimizer, values: Mapping[str, dict], model: nn.Module) -> None:
        for name, reg in self.regs.items():
            for attr, value in self.method.part(name).attributes(values[name]).items():
                setattr(reg, attr, value)
            self.sessions[name].begin_task(optimizer, model=model)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """The model's outputs on ``inputs``, inside every part's watch (feature hooks)."""
        with ExitStack() as stack:
            for name, reg in self.regs.items():
                stack.enter_context(self.method.part(name).watch(reg, model))
            return model(inputs)

    def task_loss(self, task: Task, outputs: Any, target: Any) -> Tensor:
        """The incoming batch's loss: a part's own (ER-ACE's) or the task's."""
        for name, reg in self.regs.items():
            own = self.method.part(name).task_loss(reg, task, outputs, target)
            if own is not None:
                return own
        return task.loss(outputs, target)

    def observe(self, inputs: Any, target: Any, outputs: Any) -> None:
        for name, reg in self.regs.items():
            self.method.part(name).observe(reg, inputs, target, outputs)

    def penalty(self, model: nn.Module, inputs: Any, outputs: Any) -> Tensor | float:
        return sum((s.penalty(model, inputs, outputs) for s in self.sessions.values() if s.needs_autograd), 0.0)

    def end(self, model: nn.Module, task: Task, next_values: Mapping[str, dict] | None) -> None:
        for name, session in self.sessions.items():
            if next_values is None:
                session.abort_task()
            else:
                spec = self.method.part(name).member_spec(task.spec(), next_values[name])
                session.end_task(model, task.data("train"), spec)
        if self.buffer is not None and next_values is not None:
            self.buffer.add(task.name, task.data("train"))


@dataclass
class _StageRun:
    """What one stage trains with: the task, the stage, its learning rate and the batches' seed."""

    task: Task
    stage: Stage
    lr: float
    seed: int


def _train_stage(
    model: nn.Module,
    s: _StageRun,
    batch_size: int,
    members: _Members | None = None,
    values: Mapping[str, dict] | None = None,
    tasks: Mapping[str, Task] | None = None,
) -> None:
    task, stage = s.task, s.stage
    opt, schedule = _optimizer(model, stage, s.lr)
    if members is not None:
        members.begin(opt, values or {}, model)
    batches = _batches(task.data("train"), batch_size, s.seed)
    replay = members.method.replay if members is not None else None
    model.train()
    for _ in range(stage.steps):
        x, y = next(batches)
        if members is None:
            out = model(x)
            loss = task.loss(out, y)
        else:
            out = members.forward(model, x)
            loss = members.task_loss(task, out, y) + members.penalty(model, x, out)
            if replay is not None and members.buffer is not None and members.buffer.tasks:
                loss = loss + _replay_loss(model, members.buffer, replay.per_step, replay.weight, tasks or {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if members is not None:
            members.observe(x, y, _detached(out))


def effective_settings(method: str, stages: Sequence[Stage], settings: Mapping[str, Any] | None = None) -> dict:
    """What ``method`` reads through ``stages`` with ``settings``: each per-stage setting's value in every
    stage, the others', and the learning rate of every stage (what a run's record holds)."""
    if method in REFERENCES:
        lr = float((settings or {}).get("lr", max(s.lr for s in stages)))
        return {"lr": lr, "steps": max(s.steps for s in stages)}
    m = Method.parse(method, settings)
    return {
        **m.effective(len(stages), [s.settings for s in stages]),
        "lr": [m.stage_lr(k, s.lr) for k, s in enumerate(stages, start=1)],
    }


def run(
    scenario: Scenario,
    method: str,
    stages: Sequence[Stage],
    seed: int,
    split: str = "test",
    settings: Mapping[str, Any] | None = None,
    save: str | os.PathLike | None = None,
) -> RunResult:
    """Train ``method`` (a registered method, or ``"joint"``) through ``stages`` on ``seed`` and score
    every task on ``split`` after each stage (see the module). ``save``: a path where the final model
    goes with what rebuilds it (:func:`clreg.bench.checkpoint.save_model`)."""
    check_split(split)
    start = time.perf_counter()
    tasks = scenario.task_list(stages)
    if method in REFERENCES:
        result, model = _joint(scenario, tasks, stages, seed, split, settings)
    else:
        result, model = _sequence(scenario, tasks, stages, Method.parse(method, settings), seed, split)
    result.settings = effective_settings(result.method, stages, settings)
    result.seconds = time.perf_counter() - start
    if save is not None:
        save_model(save, scenario, tasks, model, {"method": result.method, "seed": seed, "settings": result.settings})
    return result


def _sequence(
    scenario: Scenario, tasks: list[Task], stages: Sequence[Stage], m: Method, seed: int, split: str
) -> tuple[RunResult, nn.Module]:
    torch.manual_seed(seed)
    model = scenario.make_model(tasks)
    context = PartContext(tuple(tasks), tuple(scenario.feature_modules), scenario.output_specs(tasks))
    members = _Members(m, model, seed, context) if m.parts and m.name != "naive" else None
    by_name = {t.name: t for t in tasks}
    matrix, final = [], []
    for k, (task, stage) in enumerate(zip(tasks, stages), start=1):
        if k > 1:
            task.prepare(model)
        plan = _StageRun(task, stage, m.stage_lr(k, stage.lr), seed * 1000 + k)
        _train_stage(model, plan, scenario.batch_size, members, m.stage_values(k, stage.settings), by_name)
        if members is not None:
            last = k == len(stages)
            members.end(model, task, None if last else m.stage_values(k + 1, stages[k].settings))
        final = _scores(model, tasks, split)
        matrix.append([f.value() for f in final])
    return RunResult(m.name, seed, split, [t.name for t in tasks], matrix, final), model


def _joint(scenario, tasks, stages, seed, split, settings) -> tuple[RunResult, nn.Module]:
    effective = effective_settings("joint", stages, settings)
    torch.manual_seed(seed)
    model = scenario.make_model(tasks)
    streams = [_batches(t.data("train"), scenario.batch_size, seed * 1000 + k) for k, t in enumerate(tasks, 1)]
    opt = torch.optim.Adam(model.parameters(), lr=effective["lr"], foreach=True)
    model.train()
    for _ in range(effective["steps"]):
        loss = sum(t.loss(model(x), y) for t, (x, y) in zip(tasks, (next(b) for b in streams)))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    final = _scores(model, tasks, split)
    return RunResult("joint", seed, split, [t.name for t in tasks], [[f.value() for f in final]], final), model


def run_baseline(scenario: Scenario, stages: Sequence[Stage], seed: int, split: str = "test") -> list[Metric]:
    """Each stage's task trained alone from the run's initialisation (seeded), for its stage's steps at
    its learning rate, scored on ``split``: the task's baseline."""
    check_split(split)
    tasks = scenario.task_list(stages)
    out = []
    for k, (task, stage) in enumerate(zip(tasks, stages), start=1):
        torch.manual_seed(seed)
        model = scenario.make_model(tasks)
        _train_stage(model, _StageRun(task, stage, stage.lr, seed * 1000 + k), scenario.batch_size)
        out.append(_scores(model, [task], split)[0])
    return out
