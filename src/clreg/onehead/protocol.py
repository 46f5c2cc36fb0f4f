"""The run protocol of one seed: the shared first stage, the single-task baselines, the joint
reference and each method's later stages, as short functions over a :class:`SeedRun`.

A run is a list of :class:`Stage` (a task, a budget in optimizer steps, a learning rate, per-stage
method settings, a warmup) over tasks that follow the :class:`~clreg.onehead.tasks.Task` protocol.
For every method it trains the stages in order with the method's regularizer and replay buffer and
evaluates every task after every stage: the accuracy matrix ``R[stage][task]``. Each task is also
trained alone (the single-task baseline, the same budget) and all tasks together (the joint
reference). Stage 1 has no regularizer, so one stage-1 run serves every method, with the path
trackers of the parts that need one (SI's) on; each later unit starts from a saved state in the
seed's :class:`~clreg.onehead.store.UnitStore`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..bench.parts import PartContext
from ..data import stable_seed
from ..distributed import rank_and_world
from ..session import ContinualSession
from .methods import Built, Method, stage_one_trackers
from .store import EvalRecord, UnitState, UnitStore, evaluation_record
from .tasks import Task
from .training import Replay, RunSettings, TrainJob, train

__all__ = [
    "SeedResult",
    "SeedRun",
    "Stage",
    "joint",
    "method_stage",
    "method_stages",
    "run_seed",
    "single_task",
    "stage_one",
]


@dataclass(frozen=True)
class Stage:
    task: str
    steps: int
    lr: float | None = None  # None: the method's "lr" setting (the baselines': see baseline_lr)
    settings: Mapping[str, float] = field(default_factory=dict)  # per-stage overrides, e.g. {"ewc.lam": 3.0}
    warmup_steps: int | None = None  # None: the RunSettings' warmup
    baseline_lr: float | None = None  # the task's baseline (and, for stage 1, every method's first stage)

    def unit(self, name: str) -> str:
        """The name of a baseline unit of this stage: with its own baseline learning rate, if set."""
        return name if self.baseline_lr is None else f"{name}@lr{self.baseline_lr:g}"


@dataclass
class SeedRun:
    """What the units of one seed share.

    Args:
        make_model: builds a fresh model (the same architecture every time); seeded here.
        tasks: the tasks by name.
        stages: the sequence; stage 1 trains without a regularizer.
        run: batch size, weight decay, BatchNorm policy, device, …
        store: where this seed's units are kept.
        baseline_lr: the learning rate of the baselines, the joint reference and stage 1.
        wrap: an optional ``model -> model`` applied for training (e.g. DDP).
        joint_schedule: how the joint reference takes its tasks' batches (:func:`joint_plan`).
        joint_weights: the joint reference's loss weight of each task, in stage order (``None``: 1 each).
        joint_lr: the joint reference's learning rate (``None``: the first stage's baseline's).
        feature_modules: the model's modules whose outputs feature distillation (``fd``) reads.
    """

    make_model: Callable[[], nn.Module]
    tasks: dict[str, Task]
    stages: list[Stage]
    run: RunSettings
    store: UnitStore
    baseline_lr: float = 2e-3
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    joint_schedule: str = "equal"  # see joint_plan
    joint_weights: tuple[float, ...] | None = None
    joint_lr: float | None = None  # None: the first stage's baseline learning rate
    feature_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [s.task for s in self.stages if s.task not in self.tasks]
        if unknown:
            raise ValueError(f"stages name unknown tasks {unknown}; tasks: {list(self.tasks)}")
        if len({s.task for s in self.stages}) != len(self.stages):
            raise ValueError("each task may appear in one stage only")
        if self.joint_weights is not None and (
            len(self.joint_weights) != len(self.stages) or any(not w > 0 for w in self.joint_weights)
        ):
            raise ValueError(f"joint_weights must be {len(self.stages)} weights > 0, got {self.joint_weights}")

    @property
    def seed(self) -> int:
        return self.store.seed

    def fresh_model(self, unit: str) -> nn.Module:
        """A new model from the seed's one initialisation (the same for every unit), on the device."""
        torch.manual_seed(stable_seed(self.seed, "model"))
        model = self.make_model().to(self.run.device)
        self.store.seed_unit(unit)
        return model

    def evaluate(self, model: nn.Module, names: list[str] | None = None) -> dict[str, EvalRecord]:
        out = {}
        for name in names or [s.task for s in self.stages]:
            task = self.tasks[name]
            metric = task.evaluate(model, self.run.device)
            out[name] = evaluation_record(metric, self.run.resamples, task.extras(metric))
        return out

    def settings_for(self, stage: Stage) -> RunSettings:
        """The run settings for training ``stage``'s task (its own warmup where it sets one)."""
        return self.run if stage.warmup_steps is None else replace(self.run, warmup_steps=stage.warmup_steps)

    def joint_learning_rate(self) -> float:
        """The joint reference's learning rate: ``joint_lr``, else the first stage's baseline's."""
        return self.joint_lr if self.joint_lr is not None else self.lr(self.stages[0], None)

    def lr(self, stage: Stage, method: Method | None) -> float:
        """A method's learning rate in ``stage`` (the stage's own, else the method's ``lr``), or with
        ``method=None`` the baselines' (the stage's ``baseline_lr``, else its own, else the run's)."""
        if method is None and stage.baseline_lr is not None:
            return stage.baseline_lr
        if stage.lr is not None:
            return stage.lr
        return method.settings["lr"] if method is not None else self.baseline_lr


def stage_one(run: SeedRun) -> UnitState:
    """Stage 1 (no regularizer), with the first-stage path trackers on, shared by every method; its
    model is also the first task's single-task baseline."""
    s = run.stages[0]

    def fn() -> UnitState:
        model = run.fresh_model("stage1")
        trackers = stage_one_trackers(model)
        sessions = [ContinualSession(t, attach=False) for t in trackers.values()]  # their path, tracked
        job = TrainJob([run.tasks[s.task]], s.steps, run.lr(s, None), stable_seed(run.seed, "stage1"),
                       sessions=sessions, desc=f"stage 1 ({s.task})")  # fmt: skip
        res = train(run.wrap(model), job, run.settings_for(s))
        return UnitState(
            run.evaluate(model),
            train=res.record(),
            model=model.state_dict(),
            optimizer=res.optimizer,
            trackers={name: t.state_dict() for name, t in trackers.items()},
        )

    return run.store.run(s.unit("stage1"), fn)


def single_task(run: SeedRun, index: int) -> UnitState:
    """The single-task baseline of stage ``index`` (0-based; stage 0's is the stage-1 run)."""
    if index == 0:
        return stage_one(run)
    s = run.stages[index]
    unit = s.unit(f"single/{s.task}")

    def fn() -> UnitState:
        model = run.fresh_model(unit)
        job = TrainJob([run.tasks[s.task]], s.steps, run.lr(s, None), stable_seed(run.seed, unit),
                       desc=f"single-task {s.task}")  # fmt: skip
        res = train(run.wrap(model), job, run.settings_for(s))
        return UnitState(run.evaluate(model, [s.task]), train=res.record())

    return run.store.run(unit, fn)


JOINT_SCHEDULES = ("equal", "balanced", "full")


def joint_plan(stages: list[Stage], schedule: str) -> tuple[int, list[int] | None]:
    """(steps, batches per task) of the joint reference: ``equal``, Σ steps / T steps of one batch of
    every task (the sequence's compute); ``balanced``, each task the batches of its own stage (its
    baseline's), spread evenly over max-steps steps (the sequence's compute too); ``full``, max-steps
    steps of one batch of every task, so each task gets at least its baseline's optimizer steps."""
    if schedule not in JOINT_SCHEDULES:
        raise ValueError(f"joint schedule must be one of {JOINT_SCHEDULES}, got {schedule!r}")
    if schedule == "equal":
        return max(1, round(sum(s.steps for s in stages) / len(stages))), None
    if schedule == "full":
        return max(s.steps for s in stages), None
    return max(s.steps for s in stages), [s.steps for s in stages]


def joint(run: SeedRun) -> UnitState:
    """All tasks together in one model, from the seed's init; the schedule (:func:`joint_plan`) is the
    run's ``joint_schedule``, the tasks' loss weights its ``joint_weights``, the learning rate its
    ``joint_lr`` (else the first stage's baseline's)."""
    steps, per_task = joint_plan(run.stages, run.joint_schedule)
    first = run.stages[0]
    lr = run.joint_learning_rate()

    def fn() -> UnitState:
        model = run.fresh_model("joint")
        tasks = [run.tasks[s.task] for s in run.stages]
        job = TrainJob(tasks, steps, lr, stable_seed(run.seed, "joint"), desc="joint",
                       batches_per_task=per_task, task_weights=run.joint_weights)  # fmt: skip
        res = train(run.wrap(model), job, run.settings_for(first))
        return UnitState(run.evaluate(model), train=res.record(), model=model.state_dict())

    return run.store.run(first.unit(joint_unit(run.joint_schedule, run.joint_weights, run.joint_lr)), fn)


def joint_unit(schedule: str, weights: Sequence[float] | None, lr: float | None = None) -> str:
    """The joint reference's unit name: ``joint``, ``joint-balanced``, ``joint-w2-1-1``, ``joint-full-lr0.004`` …"""
    name = "joint" if schedule == "equal" else f"joint-{schedule}"
    name = name if weights is None else f"{name}-w{'-'.join(f'{w:g}' for w in weights)}"
    return name if lr is None else f"{name}-lr{lr:g}"


def method_stages(run: SeedRun, method: Method) -> list[UnitState]:
    """Stages 2… of ``method``, each from the previous one's saved state; returns every stage's
    state (stage 1's shared one first)."""
    states = [stage_one(run)]
    per_stage = [s.settings for s in run.stages]
    for i in range(1, len(run.stages)):
        prev = states[-1]
        key = method.key(per_stage, start=run.stages[0].unit("stage1"), upto=i + 1)
        states.append(run.store.run(f"{key}/stage{i + 1}", lambda i=i, prev=prev: method_stage(run, method, i, prev)))
    return states


def _start_of_stage(run: SeedRun, method: Method, i: int, prev: UnitState) -> nn.Module:
    """The previous stage's model, prepared for stage ``i``'s task (anchors are taken after this)."""
    model = run.fresh_model(f"{method.name}/stage{i + 1}")  # the same init for every setting
    model.load_state_dict(prev.model)
    run.tasks[run.stages[i].task].prepare(model)
    return model


def _consolidated(
    run: SeedRun, method: Method, model: nn.Module, prev: UnitState, prev_task: Task, values: Mapping[str, float]
) -> tuple[Built, dict[str, ContinualSession], float]:
    """The method's regularizers, carried over from the previous stage, and a
    :class:`~clreg.ContinualSession` for each member (members share the Compose's gradient ledger),
    which consolidates the previous stage's task with the member's spec (:meth:`Method.member_spec`
    for the stage's per-stage ``values``): the previous unit saved its model before consolidating."""
    built = method.build(model, seed=run.seed, context=PartContext(feature_modules=run.feature_modules))
    if built.reg is None:
        return built, {}, 0.0
    if prev.reg is not None:
        built.reg.load_state_dict(prev.reg)
    else:
        built.take_over(prev.trackers)
    built.reg.to(run.run.device)
    sessions = {name: ContinualSession(member) for name, member in built.members.items()}
    t0 = time.perf_counter()
    data, spec = _fit_data(prev_task), prev_task.spec
    for name, session in sessions.items():
        session.consolidate(model, data, method.member_spec(name, spec, values))
    return built, sessions, time.perf_counter() - t0


def _fit_data(task: Task) -> Any:
    return task.fit_data if task.fit_data is not None else task.train_data


def _fill_buffer(run: SeedRun, built: Built, prev: UnitState, prev_task: Task) -> None:
    """The replay buffer of the previous stages plus the previous task's picks (each rank offers its share)."""
    if prev.buffer is not None:
        built.buffer.load_state_dict(prev.buffer)
    data = _fit_data(prev_task)
    g = torch.Generator().manual_seed(stable_seed(run.seed, "replay-pick", prev_task.name))
    idx = torch.randperm(len(data), generator=g)[: built.buffer.capacity_per_task].tolist()
    rank, world = rank_and_world()
    built.buffer.add(prev_task.name, [data[j] for j in idx[rank::world]])


def _state_bytes(built: Built) -> int:
    """Bytes of the state a method carries between stages (regularizer checkpoint and replay buffer)."""
    n = 0
    if built.reg is not None:
        n += sum(t.numel() * t.element_size() for t in built.reg.state_dict().values() if isinstance(t, Tensor))
    if built.buffer is not None:
        n += built.buffer.state_bytes()
    return n


def method_stage(run: SeedRun, method: Method, i: int, prev: UnitState) -> UnitState:
    """Stage ``i`` (0-based, ≥ 1) of ``method``, from the previous stage's state."""
    stage, prev_task = run.stages[i], run.tasks[run.stages[i - 1].task]
    model = _start_of_stage(run, method, i, prev)
    values = method.stage_values(i + 1, stage.settings)
    built, sessions, consolidate_s = _consolidated(run, method, model, prev, prev_task, values)
    if built.buffer is not None:
        _fill_buffer(run, built, prev, prev_task)
    built.set_stage_values(values)
    s = method.settings
    replay = (
        None if built.buffer is None else Replay(built.buffer, run.tasks, int(s["replay.per_step"]), s["replay.weight"])
    )
    job = TrainJob([run.tasks[stage.task]], stage.steps, run.lr(stage, method), stable_seed(run.seed, method.name, i),
                   sessions=list(sessions.values()), replay=replay, freeze_bn=run.run.bn == "freeze", watch=built.watch,
                   desc=f"{method.name} stage {i + 1} ({stage.task})")  # fmt: skip
    res = train(run.wrap(model), job, run.settings_for(stage))
    return UnitState(
        run.evaluate(model),
        train={
            **res.record(),
            "consolidate_seconds": consolidate_s,
            "stage_values": values,
            "task_weights": method.task_weights(values),
        },
        model=model.state_dict(),
        optimizer=res.optimizer,
        reg=None if built.reg is None else built.reg.state_dict(),
        buffer=None if built.buffer is None else built.buffer.state_dict(),
        regularizer_bytes=_state_bytes(built),
    )


@dataclass
class SeedResult:
    """Every unit state of one seed: the baselines by task, the joint reference, each method's stages."""

    single: dict[str, UnitState]
    joint: UnitState | None
    methods: dict[str, list[UnitState]]


def run_seed(run: SeedRun, methods: list[Method], with_joint: bool = True) -> SeedResult:
    """The baselines, the joint reference (when asked) and every method's stages of one seed."""
    single = {s.task: single_task(run, i) for i, s in enumerate(run.stages)}
    joint_state = joint(run) if with_joint else None
    return SeedResult(single, joint_state, {m.name: method_stages(run, m) for m in methods})
