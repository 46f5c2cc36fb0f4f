"""mIoU from per-image confusion matrices (255 ignored), resampled per image."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SegmentationMetric"]


class SegmentationMetric:
    """mIoU over ``num_classes`` with ``ignore_index`` left out, from per-image confusion matrices."""

    def __init__(self, num_classes: int = 21, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._conf: list[Tensor] = []
        self._ids: list = []
        self._tm = None

    @property
    def n(self) -> int:
        return len(self._conf)

    def image_ids(self) -> list:
        return list(self._ids)

    def update(self, pred: Tensor, target: Tensor, ids: list | None = None) -> None:
        """``pred``: labels (B, H, W) or logits (B, C, H, W); ``target`` (B, H, W)."""
        if pred.dim() == 4:
            pred = pred.max(1).indices  # argmax over channels (max's indices: the same, several times faster)
        pred, target = pred.cpu(), target.cpu()
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        c = self.num_classes
        labels = target[target != self.ignore_index]
        for name, v in (("prediction", pred), ("target", labels)):
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= c):
                raise ValueError(
                    f"{name} labels must lie in [0, {c}) (or be {self.ignore_index} in the target); "
                    f"found [{int(v.min())}, {int(v.max())}]"
                )
        for i in range(pred.shape[0]):
            t, p = target[i].reshape(-1).long(), pred[i].reshape(-1).long()
            keep = t != self.ignore_index
            self._conf.append(torch.bincount(t[keep] * c + p[keep], minlength=c * c).reshape(c, c).double())
        self._ids.extend(ids if ids is not None else range(len(self._ids), len(self._ids) + pred.shape[0]))
        self._torchmetric().update(pred, target)

    def _torchmetric(self):
        if self._tm is None:
            from torchmetrics.classification import MulticlassJaccardIndex

            self._tm = MulticlassJaccardIndex(
                num_classes=self.num_classes, ignore_index=self.ignore_index, average="none", validate_args=False
            )  # the labels were range-checked in update
        return self._tm

    @staticmethod
    def _iou(conf: Tensor) -> tuple[Tensor, Tensor]:
        tp = conf.diagonal(dim1=-2, dim2=-1)
        union = conf.sum(-1) + conf.sum(-2) - tp
        return tp / union.clamp(min=1e-12), union > 0

    def per_class_iou(self) -> list[float]:
        """IoU per class on the full set (NaN for a class absent from truth and prediction)."""
        iou, present = self._iou(torch.stack(self._conf).sum(0))
        return [float(v) if p else float("nan") for v, p in zip(iou, present)]

    def value(self) -> float:
        """mIoU on the full set: torchmetrics' per-class IoU, averaged over classes that occur."""
        if not self._conf:
            raise ValueError("no images were scored")
        per_class = self._torchmetric().compute().double()
        _, present = self._iou(torch.stack(self._conf).sum(0))
        return float(per_class[present].mean())

    def scores(self, counts: Tensor) -> Tensor:
        conf = torch.einsum("rn,nij->rij", counts, torch.stack(self._conf))
        iou, present = self._iou(conf)
        return (iou * present).sum(-1) / present.sum(-1).clamp(min=1)
