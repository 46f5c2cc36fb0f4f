"""A scenario's task: its data per split, its loss, the spec its regularizers consolidate with, its metric.

Example:
    >>> from clreg.bench.task import check_split
    >>> check_split("val")
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from ..spec import TaskSpec
from .stats import Metric

__all__ = ["SPLITS", "Task", "check_split"]

SPLITS = ("train", "val", "test")
"""The splits every task has: training, validation (the tune's) and test (the report's)."""


def check_split(split: str) -> None:
    """A ValueError unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class Task(ABC):
    """One task of a scenario: its data, its loss and how it is scored.

    ``data(split)`` is a map-style Dataset of ``(input, target)`` items (the evaluation transform for
    ``"val"`` and ``"test"``), ``loss(outputs, target)`` the batch's mean training loss on the model's
    outputs, ``spec()`` the :class:`~clreg.TaskSpec` a regularizer consolidates the task with (its
    outputs and, where the Fisher needs one, its per-sample loss), and ``evaluate(model, split)`` a
    :class:`~clreg.bench.stats.Metric` over the split's samples (the harness resamples it).
    ``prepare(model)``, a no-op unless a task needs it, is called when the task's stage follows another
    (e.g. to put the task's output rows back at their prior)."""

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

    def prepare(self, model: nn.Module) -> None:  # noqa: B027  (a hook: nothing by default)
        """Called on the model when this task's stage follows another stage."""
