"""The task protocol: what a stage needs of a task, and the base class the benchmark's tasks share.

:class:`Task` is all the run protocol, ``evaluate`` and the report ask of a task (any object with
these members will do, e.g. a toy task in a test). :class:`BenchmarkTask` implements it for a task
of the one-head benchmark: its data sets, its loss and :class:`~clreg.TaskSpec`, its metric, how an
evaluation batch is scored, its extra scores, and the model preparation when its stage follows
another. A new task is one subclass (and its output in the one-head model).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ...spec import TaskSpec
from ..collate import collate
from ..metrics import Metric

__all__ = ["BenchmarkTask", "Task", "loader"]


class Task(Protocol):
    """What the run protocol needs of a task."""

    name: str
    metric_name: str
    chance: float
    train_data: Dataset
    fit_data: Dataset | None  # the training images with the evaluation transform, for consolidate
    spec: TaskSpec

    def loss(self, outputs: Any, target: Any) -> Tensor:
        """Per sample: ``(outputs, target) -> Tensor[B]``."""

    def evaluate(self, model: nn.Module, device: str | torch.device = "cpu") -> Metric:
        """The task's metric on its evaluation data."""

    def extras(self, metric: Metric) -> dict[str, Any]:
        """More figures from a metric (per-class scores, …), kept in the evaluation record."""

    def prepare(self, model: nn.Module) -> None:
        """Called on the model when the task's stage starts after another stage."""


def loader(data: Dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=collate, drop_last=drop_last
    )


def _is_channels_last(model: nn.Module) -> bool:
    first_conv = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv is not None and first_conv.is_contiguous(memory_format=torch.channels_last)


class BenchmarkTask(abc.ABC):
    """A task of the one-head benchmark: data, loss, spec, metric, scoring and extra scores.

    Class attributes: ``name`` (the key of its output and of its stage), ``title`` (in messages),
    ``metric_name``, ``folder``
    (its data folder under a data root) and ``extra_scores`` (the scalar figures of its
    :meth:`extras` worth a line in reports and ``evaluate``: record key → label).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    metric_name: ClassVar[str]
    folder: ClassVar[str]
    extra_scores: ClassVar[dict[str, str]] = {}

    def __init__(self, train_data: Dataset, eval_data: Dataset, fit_data: Dataset | None, class_names: Sequence[str]):
        self.train_data, self.eval_data, self.fit_data = train_data, eval_data, fit_data
        self.class_names = list(class_names)
        self.class_source = ""  # where the class names came from, when the data chose them

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def chance(self) -> float:
        """The metric's value for a model that has learned nothing."""
        return 0.0

    # -- data ----------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def load(cls, root: Path, eval_split: str, size: int, seed: int, names: Sequence[str] | None) -> BenchmarkTask:
        """The task on the data in ``root / cls.folder``; ``names`` the class names a manifest or a
        checkpoint gives (``None``: the data's own or the defaults)."""

    @abc.abstractmethod
    def split_files(self, data: Dataset) -> list[Path | str]:
        """The image files of one of its data sets (to check that two splits do not overlap)."""

    # -- training --------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, outputs: Any, target: Any) -> Tensor:
        """Per sample: ``(outputs, target) -> Tensor[B]``."""

    @property
    @abc.abstractmethod
    def spec(self) -> TaskSpec:
        """The outputs the regularizers consolidate and distil (and the per-sample loss, if any)."""

    def prepare(self, model: nn.Module) -> None:
        """The task's rows of the output layer back at their prior (see ``reset_task_outputs``)."""
        model.reset_task_outputs(self.name)

    # -- evaluation ------------------------------------------------------------------------------
    @abc.abstractmethod
    def new_metric(self) -> Metric:
        """An empty metric for this task's evaluation data."""

    @abc.abstractmethod
    def score_batch(self, metric: Metric, outputs: Any, targets: Any, first: int, model: nn.Module) -> None:
        """Add one evaluation batch (items ``first, first + 1, …`` of the evaluation data) to ``metric``."""

    def extras(self, metric: Metric) -> dict[str, Any]:
        return {}

    def category_map(self) -> dict[str, int]:
        """Class name → the data's own category id, where the data has ids (saved with a model)."""
        return {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: str | torch.device = "cpu", batch_size: int = 32) -> Metric:
        """The task's metric object on its eval data (the model's mode restored afterwards)."""
        was = model.training
        model.eval()
        metric = self.new_metric()
        channels_last = _is_channels_last(model)
        index = 0
        for x, y in loader(self.eval_data, batch_size, False):
            x = x.to(device)
            out = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
            self.score_batch(metric, out, y, index, model)
            index += x.shape[0]
        model.train(was)
        return metric
