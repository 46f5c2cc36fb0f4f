"""Object detection on COCO-format data: boxes decoded from the head's centre heatmap, scored by
COCO mAP@0.5 (and mAP@[.5:.95]) against the original annotations at the original resolution."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...spec import OutputSpec, TaskSpec
from ..data import DetectionData, choose_categories
from ..losses import detection_loss
from ..metrics import DetectionMetric
from ..targets import decode_detections
from .base import BenchmarkTask

__all__ = ["DetectionTask"]


class DetectionTask(BenchmarkTask):
    name = "det"
    title = "detection"
    metric_name = "mAP@0.5"
    folder = "mini_coco_det"
    extra_scores: ClassVar[dict[str, str]] = {"map_50_95": "mAP@[.5:.95]"}

    @classmethod
    def load(cls, root: Path, eval_split: str, size: int, seed: int, names: Sequence[str] | None) -> DetectionTask:
        """The categories are ``names`` when given, else chosen from the data (:func:`choose_categories`)."""
        d = root / cls.folder
        cats, source = (list(names), "given") if names else choose_categories(d)
        train = DetectionData(d, "train", size, cats, train=True, seed=seed)
        evaluation = DetectionData(d, eval_split, size, cats)
        fit = DetectionData(d, "train", size, cats)
        task = cls(train, evaluation, fit, cats)
        task.class_source = source
        return task

    def split_files(self, data: DetectionData) -> list[str]:
        return [i["file_name"] for i in data.images]

    def loss(self, outputs: Any, target: dict[str, Tensor]) -> Tensor:
        return detection_loss(outputs[self.name], target)

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(
            outputs=[
                OutputSpec(select=f"{self.name}.heatmap", kind="sigmoid"),
                OutputSpec(select=f"{self.name}.box", kind="regression", weight=f"{self.name}.objectness"),
            ],
            per_sample_loss=self.loss,
        )

    def new_metric(self) -> DetectionMetric:
        return DetectionMetric(self.eval_data.coco_gt)

    def score_batch(self, metric: DetectionMetric, outputs: Any, targets: Any, first: int, model: nn.Module) -> None:
        """Decoded boxes mapped back to each image's original size, labelled with the split's category ids."""
        data = self.eval_data
        out = outputs[self.name]
        dets = decode_detections(out["heatmap"], out["box"], stride=model.stride)
        for i, d in enumerate(dets):
            info = data.image_info(first + i)
            size = [info["width"], info["height"], info["width"], info["height"]]
            scale = torch.tensor(size, dtype=torch.float64) / data.size
            cats = [data.category_id(int(label)) for label in d["labels"]]
            keep = [i for i, c in enumerate(cats) if c is not None]  # a category this split lacks matches nothing
            boxes, scores = d["boxes"].double().cpu() * scale, d["scores"].cpu()
            if len(keep) < len(cats):
                boxes, scores, cats = boxes[keep], scores[keep], [cats[i] for i in keep]
            metric.update(info["id"], boxes, scores, cats)

    def extras(self, metric: DetectionMetric) -> dict[str, Any]:
        ap = metric.per_class_ap()
        names = {self.eval_data.category_id(i): n for i, n in enumerate(self.class_names)}
        names.pop(None, None)
        return {"map_50_95": metric.map_50_95(), "per_class_ap": {names.get(k, str(k)): v for k, v in ap.items()}}

    def category_map(self) -> dict[str, int]:
        ids = {n: self.eval_data.category_id(i) for i, n in enumerate(self.class_names)}
        return {n: i for n, i in ids.items() if i is not None}
