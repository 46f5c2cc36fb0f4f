"""What a run does, counted before it starts: optimizer steps, training images (replayed ones
included), samples of the consolidations' passes over data (Fisher, MAS importance) and evaluated
images, per seed, for each unit and in all. Recorded in ``results.json`` (``work``) and logged, so two
configurations' budgets compare without timing them.
"""

from __future__ import annotations

from typing import Any

from ..methods import Method
from ..protocol import joint_plan
from .workspace import Workspace

__all__ = ["planned_work"]

KINDS = ("optimizer_steps", "training_images", "consolidation_samples", "evaluated_images")


def _unit(steps: int, images: int, consolidation: int, evaluated: int) -> dict[str, int]:
    return dict(zip(KINDS, (steps, images, consolidation, evaluated)))


def _evaluated(ws: Workspace, tasks: list[str]) -> int:
    return sum(len(ws.tasks[t].eval_data) for t in tasks)


def _fit_size(ws: Workspace, task: str) -> int:
    t = ws.tasks[task]
    return len(t.fit_data if t.fit_data is not None else t.train_data)


def _method(ws: Workspace, method: Method) -> dict[str, int]:
    """Stages 2… of ``method``: its steps, its batches and replayed images, its parts' passes over the
    previous task's data, and every task evaluated after each stage."""
    cfg, tasks = ws.config, list(ws.config.tasks)
    batch = cfg.profile.batch_size
    replayed = int(method.settings["replay.per_step"]) if method.uses_replay else 0
    passes = method.data_passes
    total = _unit(0, 0, 0, 0)
    for i in range(1, len(tasks)):
        steps = cfg.steps[i]
        stage = _unit(steps, steps * (batch + replayed), passes * _fit_size(ws, tasks[i - 1]), _evaluated(ws, tasks))
        total = {k: total[k] + stage[k] for k in KINDS}
    return total


def planned_work(ws: Workspace) -> dict[str, Any]:
    """``{"per_seed": {unit: counts}, "per_seed_total": counts, "total": counts}`` for ``ws``'s run."""
    cfg, tasks = ws.config, list(ws.config.tasks)
    batch = cfg.profile.batch_size
    units = {"stage1": _unit(cfg.steps[0], cfg.steps[0] * batch, 0, _evaluated(ws, tasks))}
    for i in range(1, len(tasks)):
        units[f"single/{tasks[i]}"] = _unit(cfg.steps[i], cfg.steps[i] * batch, 0, _evaluated(ws, [tasks[i]]))
    if cfg.joint:
        steps, per_task = joint_plan(ws.stages, cfg.profile.joint_schedule)
        batches = sum(per_task) if per_task is not None else steps * len(tasks)
        units["joint"] = _unit(steps, batches * batch, 0, _evaluated(ws, tasks))
    for name in cfg.methods:
        units[name] = _method(ws, Method.parse(name, cfg.settings_for(name)))
    per_seed = {k: sum(u[k] for u in units.values()) for k in KINDS}
    return {
        "per_seed": units,
        "per_seed_total": per_seed,
        "total": {k: v * len(cfg.seeds) for k, v in per_seed.items()},
    }


def describe(work: dict[str, Any]) -> str:
    """One line: the whole run's counts."""
    t = work["total"]
    return (
        f"{t['optimizer_steps']:,} optimizer steps ({t['training_images']:,} training images), "
        f"{t['consolidation_samples']:,} samples of consolidation passes, {t['evaluated_images']:,} evaluated images"
    )
