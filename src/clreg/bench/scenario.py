"""The contract a scenario fulfils, the stage list, and the registry of scenarios by name.

A :class:`Scenario` supplies its tasks by name (:class:`Task`: data per split, loss, the spec for the
Fisher and distillation, a metric), a model built from the task list, the default stages and what a
checkpoint records; the harness (:mod:`clreg.bench.runner`, the tune, the report) does the rest, the
same way for every scenario. A run is a list of :class:`Stage` in any order the scenario's tasks allow.

Example:
    >>> from clreg.bench.scenario import Stage
    >>> Stage("seg", steps=600, lr=4e-3, settings={"ewc.lam": 1e4})
    Stage(task='seg', steps=600, lr=0.004, warmup=0, settings={'ewc.lam': 10000.0})
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from ..spec import TaskSpec
from .method import check_stage_key
from .settings import parse_settings
from .stats import Metric

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

SPLITS = ("train", "val", "test")

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


class Task(ABC):
    """One task of a scenario: its data, its loss and how it is scored.

    ``data(split)`` is a map-style Dataset of ``(input, target)`` items (the evaluation transform for
    ``"val"`` and ``"test"``), ``loss(outputs, target)`` the batch's mean training loss on the model's
    outputs, ``spec()`` the :class:`~clreg.TaskSpec` a regularizer consolidates the task with (its
    outputs and, where the Fisher needs one, its per-sample loss), and ``evaluate(model, split)`` a
    :class:`~clreg.bench.stats.Metric` over the split's samples (the harness resamples it)."""

    name: str = ""
    chance: float = 0.0  # the metric's value for a model that guesses

    @abstractmethod
    def data(self, split: str) -> Dataset: ...

    @abstractmethod
    def loss(self, outputs: Any, target: Any) -> Tensor: ...

    @abstractmethod
    def spec(self) -> TaskSpec: ...

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> Metric: ...


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


SCENARIOS: dict[str, Callable[..., Scenario]] = {}


def register_scenario(name: str) -> Callable[[Callable[..., Scenario]], Callable[..., Scenario]]:
    """Register a scenario's factory (its keyword arguments are the scenario's options) under ``name``."""

    def add(factory: Callable[..., Scenario]) -> Callable[..., Scenario]:
        if name in SCENARIOS:
            raise ValueError(f"a scenario named {name!r} is already registered")
        SCENARIOS[name] = factory
        return factory

    return add


def make_scenario(name: str, **options: Any) -> Scenario:
    """The scenario ``name`` built with ``options`` (a ValueError naming the known scenarios, or the
    option the factory refuses)."""
    from . import scenarios  # noqa: F401  (registers the built-in scenarios)

    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; scenarios: {', '.join(sorted(SCENARIOS))}")
    factory = SCENARIOS[name]
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as e:
        raise ValueError(f"scenario {name!r}: {e}") from None
    return factory(**options)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
