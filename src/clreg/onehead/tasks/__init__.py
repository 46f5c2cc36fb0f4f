"""The benchmark's tasks, one class each over the shared :class:`~clreg.onehead.tasks.base.BenchmarkTask`,
registered by name; :func:`make_tasks` loads them from a data root.

Example:
    >>> import tempfile
    >>> from clreg.onehead.synthetic import SyntheticConfig, generate
    >>> from clreg.onehead.tasks import make_tasks
    >>> root = generate(SyntheticConfig(train=4, val=2, test=2, size=64, cls_train=10), cache_dir=tempfile.mkdtemp())
    >>> tasks = make_tasks(root, size=64)
    >>> [(t.name, t.metric_name, t.num_classes) for t in tasks.values()]
    [('seg', 'mIoU', 21), ('det', 'mAP@0.5', 10), ('cls', 'Top-1', 10)]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..data import check_split_overlap
from ..metrics import Metric
from .base import BenchmarkTask, Task, loader
from .classification import ClassificationTask
from .detection import DetectionTask
from .segmentation import SegmentationTask

__all__ = [
    "FOLDERS",
    "METRIC_NAMES",
    "TASK_NAMES",
    "TASK_TYPES",
    "BenchmarkTask",
    "ClassificationTask",
    "DetectionTask",
    "SegmentationTask",
    "Task",
    "evaluate",
    "loader",
    "make_tasks",
]

TASK_TYPES: dict[str, type[BenchmarkTask]] = {t.name: t for t in (SegmentationTask, DetectionTask, ClassificationTask)}
TASK_NAMES = tuple(TASK_TYPES)
METRIC_NAMES = {name: t.metric_name for name, t in TASK_TYPES.items()}
FOLDERS = {name: t.folder for name, t in TASK_TYPES.items()}


def make_tasks(
    root: str | Path,
    eval_split: str = "test",
    size: int = 160,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    class_names: dict[str, list[str]] | None = None,
) -> dict[str, BenchmarkTask]:
    """Every registered task on a data root holding each task's folder. ``class_names`` (e.g. a
    checkpoint's, or a synthetic manifest's, read from ``root/manifest.json`` when not given) names
    each task's classes; ``categories`` the detection categories. Each task's ``class_source`` says
    where its names came from."""
    root = Path(root)
    manifest = root / "manifest.json"
    source = "given"
    if class_names is None and manifest.is_file():
        class_names, source = json.loads(manifest.read_text())["class_names"], "the data's manifest"
    names: dict[str, Any] = dict(class_names or {})
    sources = {name: source for name in names}
    if categories:
        names["det"], sources["det"] = list(categories), "named by --categories"
    tasks = {name: t.load(root, eval_split, size, seed, names.get(name)) for name, t in TASK_TYPES.items()}
    for name, t in tasks.items():
        t.class_source = sources.get(name, t.class_source)
    for t in tasks.values():
        check_split_overlap(t.split_files(t.train_data), t.split_files(t.eval_data), t.title)
    return tasks


def evaluate(model: nn.Module, task: BenchmarkTask, batch_size: int = 32, device: str = "cpu") -> Metric:
    """``task.evaluate(model, device, batch_size)``: the task's metric on its evaluation data."""
    return task.evaluate(model, device=device, batch_size=batch_size)
