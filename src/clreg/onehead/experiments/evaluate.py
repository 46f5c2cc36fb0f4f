"""Evaluating a saved one-head model as the challenge's grader does: each task's metric (and its
extra scores) on a data root's split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..model import load_checkpoint
from ..tasks import TASK_NAMES, make_tasks

__all__ = ["EvaluateRequest", "evaluate_checkpoint"]


@dataclass(frozen=True)
class EvaluateRequest:
    checkpoint: str
    data_root: str
    tasks: str | None = None  # comma-separated task names; None: every task the model has
    split: str = "val"
    device: str = "cpu"


def evaluate_checkpoint(req: EvaluateRequest) -> dict[str, float]:
    """Metric name → value for every task asked (a ValueError names a bad task or folder)."""
    model, meta = load_checkpoint(req.checkpoint, map_location="cpu")
    model.to(req.device)
    has = [t for t in TASK_NAMES if t in model.tasks]
    wanted = has if req.tasks is None else [t.strip() for t in req.tasks.split(",") if t.strip()]
    bad = [t for t in wanted if t not in TASK_NAMES]
    if bad or not wanted:
        raise ValueError(f"--tasks: unknown {bad}; choose from {', '.join(TASK_NAMES)}")
    missing = [t for t in wanted if t not in has]
    if missing:
        raise ValueError(f"--tasks: the model in {req.checkpoint} has no output for {missing}; it has {has}")
    root = Path(req.data_root)
    if not root.is_dir():
        raise ValueError(f"--data-root: no such folder {root}")
    tasks = make_tasks(root, eval_split=req.split, size=int(meta["input_size"]), class_names=meta["class_names"])
    scores = {}
    for name in wanted:
        task = tasks[name]
        metric = task.evaluate(model, device=req.device)
        scores[task.metric_name] = metric.value()
        extras = task.extras(metric)
        scores |= {label: extras[key] for key, label in task.extra_scores.items()}
    return scores
