"""The contract a scenario fulfils and the stage list (the registry of scenarios by name is
:mod:`clreg.bench.registry`, its names re-exported here).

A :class:`Scenario` supplies its tasks by name (:class:`~clreg.bench.task.Task`: data per split, loss,
the spec for the Fisher and distillation, a metric), a model built from the task list, the default stages and what a
checkpoint records; the harness (:mod:`clreg.bench.runner`, the tune, the report) does the rest, the
same way for every scenario. A run is a list of :class:`Stage` in any order the scenario's tasks allow.

Example:
    >>> from clreg.bench.scenario import Stage
    >>> Stage("seg", steps=600, lr=4e-3, settings={"ewc.lam": 1e4})
    Stage(task='seg', steps=600, lr=0.004, warmup=0, settings={'ewc.lam': 10000.0})
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..spec import OutputSpec
from .method import check_stage_key
from .registry import SCENARIOS, make_scenario, register_scenario
from .settings import parse_settings
from .task import SPLITS, Task, check_split

__all__ = [
    "DEFAULT_METHODS",
    "SCENARIOS",
    "SPLITS",
    "Scenario",
    "Stage",
    "Task",
    "check_split",
    "make_scenario",
    "register_scenario",
]

DEFAULT_METHODS = (
    "naive", "joint", "ewc", "online_ewc", "si", "lwf", "mas", "kfac_ewc", "rwalk", "l2sp", "fd", "replay",
    "der", "derpp", "er_ace", "agem", "lwf+replay", "ewc+lwf", "ewc+replay", "ewc+lwf+replay",
)  # fmt: skip
"""The references, every registered part alone and the combinations of EWC, LwF and replay."""


@dataclass(frozen=True)
class Stage:
    """One stage: train ``task`` for ``steps`` optimizer steps at learning rate ``lr`` (a linear warmup
    over the first ``warmup`` steps), with per-stage ``settings`` (e.g. ``{"ewc.lam": 1e4}``: this
    stage's value where a method sets none of its own)."""

    task: str
    steps: int
    lr: float
    warmup: int = 0
    settings: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"a stage's task is a task's name, got {self.task!r}")
        for name in ("steps", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "steps" else 0):
                raise ValueError(f"a stage's {name} is an int >= {1 if name == 'steps' else 0}, got {value!r}")
        if not float(self.lr) > 0:
            raise ValueError(f"a stage's lr is > 0, got {self.lr!r}")
        keys = parse_settings(self.settings)
        if any(k.stage is not None or k.method is not None for k in keys):
            raise ValueError(f"a stage's settings hold plain names (the stage is implied), got {list(self.settings)}")
        for key in keys:
            check_stage_key(key)
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "settings", {str(k): float(v) for k, v in keys.items()})


class Scenario(ABC):
    """A continual-learning scenario (see the module). ``tasks`` holds every task it can run, by name;
    :meth:`make_model` builds the model for the tasks a run trains, in stage order."""

    name: str = ""
    batch_size: int = 32
    options: Mapping[str, Any] = {}  # the keyword arguments it was built with (make_scenario rebuilds it)
    methods: Sequence[str] = DEFAULT_METHODS  # what "--methods all" runs
    tune_grid: Mapping[str, Sequence[float]] = {}  # each searched setting's values
    defaults: Mapping[str, float] = {}  # method settings of this scenario, under any tuned or given ones
    feature_modules: Sequence[str] = ()  # the model's modules whose outputs feature distillation (fd) reads

    def output_specs(self, tasks: Sequence[Task]) -> list[OutputSpec] | None:
        """The outputs of a model built for ``tasks`` as a part that matches all of them selects them
        (DER's stored outputs); ``None`` (the default): the model's output is one tensor."""
        return None

    @property
    def tuned_key(self) -> str:
        """The name of the shipped tune's file, ``clreg/bench/tuned/<tuned_key>.json``."""
        return self.name

    def tuned(self) -> dict[str, Any]:
        """The shipped tune: ``{"seeds": the tune's seeds, "methods": {method: settings}}`` (empty
        without one)."""
        path = Path(__file__).parent / "tuned" / f"{self.tuned_key}.json"
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        return {"seeds": data["seeds"], "methods": {m: t["settings"] for m, t in data["methods"].items()}}

    @property
    @abstractmethod
    def tasks(self) -> Mapping[str, Task]: ...

    @abstractmethod
    def default_stages(self) -> list[Stage]: ...

    @abstractmethod
    def make_model(self, tasks: Sequence[Task]) -> nn.Module: ...

    def record(self, tasks: Sequence[Task]) -> dict[str, Any]:
        """What a checkpoint of a model built for ``tasks`` records, so that it can be rebuilt."""
        record: dict[str, Any] = {"scenario": self.name, "tasks": [t.name for t in tasks]}
        if self.options:
            record["options"] = dict(self.options)
        return record

    def stages(self, order: Sequence[str] | None = None) -> list[Stage]:
        """The default stages, in ``order`` (task names; ``None`` for the default order)."""
        stages = self.default_stages()
        if order is None:
            return stages
        by_task = {s.task: s for s in stages}
        unknown = [t for t in order if t not in by_task]
        if unknown or len(set(order)) != len(order) or not order:
            raise ValueError(f"a stage order names each of the tasks {list(by_task)} at most once, got {list(order)}")
        return [by_task[t] for t in order]

    def task_list(self, stages: Sequence[Stage]) -> list[Task]:
        """The tasks of ``stages``, in order (a ValueError naming an unknown one)."""
        unknown = [s.task for s in stages if s.task not in self.tasks]
        if unknown:
            raise ValueError(f"scenario {self.name!r} has no task(s) {unknown}; its tasks: {list(self.tasks)}")
        return [self.tasks[s.task] for s in stages]
