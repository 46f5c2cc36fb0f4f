"""Image classification from class folders, scored by Top-1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ...spec import OutputSpec, TaskSpec
from ..data import ClassificationData
from ..losses import classification_loss
from ..metrics import ClassificationMetric
from .base import BenchmarkTask

__all__ = ["ClassificationTask"]


class ClassificationTask(BenchmarkTask):
    name = "cls"
    title = "classification"
    metric_name = "Top-1"
    folder = "imagenette_160"

    @classmethod
    def load(cls, root: Path, eval_split: str, size: int, seed: int, names: Sequence[str] | None) -> ClassificationTask:
        d = root / cls.folder
        train = ClassificationData(d, "train", size, train=True, seed=seed, classes=names)
        evaluation = ClassificationData(d, eval_split, size, classes=train.classes)
        fit = ClassificationData(d, "train", size, classes=train.classes)
        return cls(train, evaluation, fit, train.classes)

    def split_files(self, data: ClassificationData) -> list[Path]:
        return [p for p, _ in data.samples]

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    def loss(self, outputs: Any, target: Tensor) -> Tensor:
        return classification_loss(outputs[self.name], target)

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(outputs=[OutputSpec(select=self.name, kind="softmax")])

    def new_metric(self) -> ClassificationMetric:
        return ClassificationMetric(self.num_classes)

    def score_batch(
        self, metric: ClassificationMetric, outputs: Any, targets: Tensor, first: int, model: nn.Module
    ) -> None:
        metric.update(outputs[self.name].cpu(), targets, ids=list(range(first, first + targets.shape[0])))
