"""Semantic segmentation: 21 classes (background included) scored by mIoU at the masks' original size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...spec import OutputSpec, TaskSpec
from ..data import SegmentationData
from ..losses import IGNORE_INDEX, segmentation_loss
from ..metrics import SegmentationMetric
from .base import BenchmarkTask

__all__ = ["SegmentationTask"]

DEFAULT_CLASSES = 21


class SegmentationTask(BenchmarkTask):
    name = "seg"
    title = "segmentation"
    metric_name = "mIoU"
    folder = "mini_voc_seg"

    @classmethod
    def load(cls, root: Path, eval_split: str, size: int, seed: int, names: Sequence[str] | None) -> SegmentationTask:
        d = root / cls.folder
        train = SegmentationData(d, "train", size, train=True, seed=seed)
        evaluation = SegmentationData(d, eval_split, size)
        fit = SegmentationData(d, "train", size)
        return cls(train, evaluation, fit, names or [str(i) for i in range(DEFAULT_CLASSES)])

    def split_files(self, data: SegmentationData) -> list[Path]:
        return [p for p, _ in data.pairs]

    def loss(self, outputs: Any, target: Tensor) -> Tensor:
        return segmentation_loss(outputs[self.name], target)

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(outputs=[OutputSpec(select=self.name, kind="softmax", ignore_index=IGNORE_INDEX)])

    def new_metric(self) -> SegmentationMetric:
        return SegmentationMetric(self.num_classes)

    def score_batch(self, metric: SegmentationMetric, outputs: Any, targets: Any, first: int, model: nn.Module) -> None:
        """Logits upsampled to each mask's original size (the whole batch at once when they agree)."""
        logits = outputs[self.name]
        n = logits.shape[0]
        masks = [self.eval_data.original_mask(first + i) for i in range(n)]
        if all(m.shape == masks[0].shape for m in masks):
            parts = [(logits, torch.stack(masks), list(range(first, first + n)))]
        else:
            parts = [(logits[i : i + 1], m[None], [first + i]) for i, m in enumerate(masks)]
        for z, true, ids in parts:
            if tuple(true.shape[-2:]) != tuple(z.shape[-2:]):
                z = F.interpolate(z, size=tuple(true.shape[-2:]), mode="bilinear", align_corners=False)
            metric.update(z, true, ids=ids)

    def extras(self, metric: SegmentationMetric) -> dict[str, Any]:
        return {"per_class_iou": dict(zip(self.class_names, metric.per_class_iou()))}
