r"""Metrics with bootstrap intervals: mIoU, COCO mAP (pycocotools) and Top-1.

Each metric collects per-image records once, then scores any resampling of the images given as a
count matrix ``counts`` (R, n) — how often each image is drawn in each of R resamples — so a
bootstrap interval costs one vectorised pass, and two models scored on the same images with the
same counts give a paired interval of their ratio.

* :class:`SegmentationMetric`: per-image confusion matrices (255 ignored); IoU_c = TP / (TP + FP + FN)
  over the summed confusion; mIoU = the mean over classes that occur (in prediction or truth). The
  full-set value is torchmetrics' ``MulticlassJaccardIndex`` (checked equal in the tests).
* :class:`DetectionMetric`: COCOeval (bbox) runs once on the decoded boxes against the original
  annotations at the original image size (crowd boxes ignored, as COCOeval does); mAP@0.5 and
  mAP@[.5:.95] are its ``stats[1]`` and ``stats[0]``. For resamples, the per-image match records of
  ``evalImgs`` (area "all", 100 detections) are re-accumulated by a vectorised copy of COCOeval's
  accumulate step with per-image weights; on the full set it agrees with COCOeval.
* :class:`ClassificationMetric`: Top-1 (torchmetrics' ``MulticlassAccuracy``, micro).

Example:
    >>> import torch
    >>> from clreg.onehead.metrics import ClassificationMetric, bootstrap
    >>> m = ClassificationMetric(num_classes=3)
    >>> m.update(torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0], [9.0, 0, 0]]), torch.tensor([0, 1, 2, 2]))
    >>> m.value()
    0.75
    >>> ci = bootstrap(m, resamples=200, seed=0)
    >>> ci["lo"] <= 0.75 <= ci["hi"]
    True
"""

from ...bench.stats import (
    HierarchicalDraws,
    Metric,
    bootstrap,
    hierarchical_draws,
    interval,
    paired_ratio,
    resample_counts,
)
from .classification import ClassificationMetric
from .detection import DetectionMetric
from .segmentation import SegmentationMetric

__all__ = [
    "ClassificationMetric",
    "DetectionMetric",
    "HierarchicalDraws",
    "Metric",
    "SegmentationMetric",
    "bootstrap",
    "hierarchical_draws",
    "interval",
    "paired_ratio",
    "resample_counts",
]
