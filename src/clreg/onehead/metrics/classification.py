"""Top-1 accuracy, resampled per image."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ClassificationMetric"]


class ClassificationMetric:
    """Top-1 accuracy."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._correct: list[Tensor] = []
        self._ids: list = []
        self._tm = None

    @property
    def n(self) -> int:
        return int(sum(c.numel() for c in self._correct))

    def image_ids(self) -> list:
        return list(self._ids)

    def update(self, logits: Tensor, target: Tensor, ids: list | None = None) -> None:
        pred = logits.argmax(1) if logits.dim() == 2 else logits
        self._correct.append((pred.cpu() == target.cpu()).double())
        self._ids.extend(ids if ids is not None else range(len(self._ids), len(self._ids) + pred.shape[0]))
        if self._tm is None:
            from torchmetrics.classification import MulticlassAccuracy

            self._tm = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self._tm.update(pred.cpu(), target.cpu())

    def value(self) -> float:
        if self._tm is None:
            raise ValueError("no images were scored")
        return float(self._tm.compute())

    def scores(self, counts: Tensor) -> Tensor:
        correct = torch.cat(self._correct)
        return counts @ correct / counts.sum(1)
