"""The three tasks as data + loss + evaluation, and a plain training loop for one task.

A :class:`Task` bundles what a stage needs: train / eval data sets, the per-sample loss, the
:class:`~clreg.TaskSpec` the regularizers consolidate with, and an ``evaluate(model)`` that returns a
metric object (with ``value()`` and bootstrap ``scores``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..spec import OutputSpec, TaskSpec
from .data import COCO_DEFAULT_CATEGORIES, ClassificationData, DetectionData, SegmentationData, check_split_overlap
from .harness import RunSettings, collate, train_steps
from .losses import IGNORE_INDEX, classification_loss, detection_loss, segmentation_loss
from .metrics import ClassificationMetric, DetectionMetric, SegmentationMetric
from .targets import decode_detections

__all__ = ["METRIC_NAMES", "TASK_NAMES", "Task", "evaluate", "make_tasks", "train_task"]

TASK_NAMES = ("seg", "det", "cls")
METRIC_NAMES = {"seg": "mIoU", "det": "mAP@0.5", "cls": "Top-1"}
FOLDERS = {"seg": "mini_voc_seg", "det": "mini_coco_det", "cls": "imagenette_160"}


@dataclass
class Task:
    name: str
    train_data: Dataset
    eval_data: Dataset
    loss: Callable[[Any, Any], Tensor]
    spec: TaskSpec
    num_classes: int
    class_names: list[str]
    fit_data: Dataset | None = None  # the training images with the evaluation transform (for consolidate)
    chance: float = 0.0  # the metric's value for a model that has learned nothing

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES[self.name]


def make_tasks(
    root: str | Path,
    eval_split: str = "test",
    size: int = 160,
    seed: int = 0,
    categories: list[str] | None = None,
    class_names: dict[str, list[str]] | None = None,
) -> dict[str, Task]:
    """The three tasks on a data root holding ``mini_voc_seg``, ``mini_coco_det`` and ``imagenette_160``.
    ``class_names`` (e.g. a synthetic manifest's) names the detection categories and classes."""
    root = Path(root)
    manifest = root / "manifest.json"
    if class_names is None and manifest.is_file():
        class_names = json.loads(manifest.read_text())["class_names"]
    cats = categories or (class_names or {}).get("det") or list(COCO_DEFAULT_CATEGORIES)
    seg_names = (class_names or {}).get("seg")
    seg_train = SegmentationData(root / FOLDERS["seg"], "train", size, train=True, seed=seed)
    seg_eval = SegmentationData(root / FOLDERS["seg"], eval_split, size)
    det_train = DetectionData(root / FOLDERS["det"], "train", size, cats, train=True, seed=seed)
    det_eval = DetectionData(root / FOLDERS["det"], eval_split, size, cats)
    cls_classes = (class_names or {}).get("cls")
    cls_train = ClassificationData(root / FOLDERS["cls"], "train", size, train=True, seed=seed, classes=cls_classes)
    cls_eval = ClassificationData(root / FOLDERS["cls"], eval_split, size, classes=cls_train.classes)
    seg_fit = SegmentationData(root / FOLDERS["seg"], "train", size)
    det_fit = DetectionData(root / FOLDERS["det"], "train", size, cats)
    cls_fit = ClassificationData(root / FOLDERS["cls"], "train", size, classes=cls_train.classes)
    n_seg = len(seg_names) if seg_names else 21
    check_split_overlap([p for p, _ in seg_train.pairs], [p for p, _ in seg_eval.pairs], "segmentation")
    check_split_overlap(
        [i["file_name"] for i in det_train.images], [i["file_name"] for i in det_eval.images], "detection"
    )
    check_split_overlap([p for p, _ in cls_train.samples], [p for p, _ in cls_eval.samples], "classification")
    return {
        "seg": Task(
            "seg",
            seg_train,
            seg_eval,
            segmentation_loss,
            TaskSpec(outputs=[OutputSpec(select="seg", kind="softmax", ignore_index=IGNORE_INDEX)]),
            n_seg,
            list(seg_names or [str(i) for i in range(n_seg)]),
            fit_data=seg_fit,
        ),
        "det": Task(
            "det",
            det_train,
            det_eval,
            detection_loss,
            TaskSpec(
                outputs=[
                    OutputSpec(select="det.heatmap", kind="sigmoid"),
                    OutputSpec(select="det.box", kind="regression", weight="det.objectness"),
                ],
                per_sample_loss=detection_loss,
            ),
            len(cats),
            list(cats),
            fit_data=det_fit,
        ),
        "cls": Task(
            "cls",
            cls_train,
            cls_eval,
            classification_loss,
            TaskSpec(outputs=[OutputSpec(select="cls", kind="softmax")]),
            len(cls_train.classes),
            list(cls_train.classes),
            fit_data=cls_fit,
            chance=1.0 / len(cls_train.classes),
        ),
    }


def loader(data: Dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=collate, drop_last=drop_last
    )


def train_task(
    model: nn.Module,
    task: Task,
    steps: int,
    *,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    regularizer: Any = None,
    log: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """AdamW with a cosine schedule for ``steps`` optimizer steps on one task's loss (+ regularizer):
    the harness's :func:`~clreg.onehead.harness.train_steps` for one task (a progress bar when
    ``log`` is given, then one line to it)."""
    run = RunSettings(batch_size=batch_size, weight_decay=weight_decay, device=str(device), progress=log is not None)
    res = train_steps(model, [task], steps, lr, run, seed, reg=regularizer, desc=task.name)
    res.pop("optimizer")
    if log is not None:
        log(f"{task.name}: {steps} steps, loss {res['loss']:.4f} ({res['seconds']:.0f} s)")
    return res


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch_size: int = 32, device: str | torch.device = "cpu") -> Any:
    """The task's metric object on its eval data (mIoU at the masks' original size; boxes mapped back to
    the original image size for COCOeval)."""
    was = model.training
    model.eval()
    data = task.eval_data
    if task.name == "seg":
        metric = SegmentationMetric(task.num_classes)
    elif task.name == "det":
        metric = DetectionMetric(data.coco_gt)
    else:
        metric = ClassificationMetric(task.num_classes)
    first_conv = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels_last = first_conv is not None and first_conv.is_contiguous(memory_format=torch.channels_last)
    index = 0
    for x, y in loader(data, batch_size, False):
        x = x.to(device)
        out = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        n = x.shape[0]
        if task.name == "seg":
            masks = [data.original_mask(index + i) for i in range(n)]
            if all(m.shape == masks[0].shape for m in masks):  # the whole batch in one call
                parts = [(out["seg"], torch.stack(masks), list(range(index, index + n)))]
            else:
                parts = [(out["seg"][i : i + 1], m[None], [index + i]) for i, m in enumerate(masks)]
            for logits, true, ids in parts:
                if tuple(true.shape[-2:]) != tuple(logits.shape[-2:]):
                    logits = F.interpolate(logits, size=tuple(true.shape[-2:]), mode="bilinear", align_corners=False)
                metric.update(logits, true, ids=ids)
        elif task.name == "det":
            dets = decode_detections(out["det"]["heatmap"], out["det"]["box"], stride=model.stride)
            for i, d in enumerate(dets):
                info = data.image_info(index + i)
                scale = (
                    torch.tensor([info["width"], info["height"], info["width"], info["height"]], dtype=torch.float64)
                    / data.size
                )
                boxes = d["boxes"].double().cpu() * scale
                cats = [data.category_id(int(label)) for label in d["labels"]]
                metric.update(info["id"], boxes, d["scores"].cpu(), cats)
        else:
            metric.update(out["cls"].cpu(), y, ids=list(range(index, index + n)))
        index += n
    model.train(was)
    return metric
