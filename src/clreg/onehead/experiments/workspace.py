"""Everything a configured experiment works in: the data (generated when synthetic), the evaluation
split, the tasks, the model factory, the stages, the run settings, logging and the process group."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ...distributed import rank_and_world
from ..config import BenchmarkConfig, check_resume
from ..model import UnifiedOneHead, make_backbone
from ..protocol import SeedRun, Stage
from ..provenance import data_hash
from ..store import UnitStore
from ..synthetic import generate
from ..tasks import FOLDERS, BenchmarkTask, make_tasks
from ..training import RunSettings

__all__ = ["Workspace", "has_split", "logger", "open_workspace"]


def logger(quiet: bool) -> Callable[[str], None]:
    """One line at a time on rank 0's standard output, unless ``quiet``."""

    def log_line(msg: str) -> None:
        if not quiet and rank_and_world()[0] == 0:
            print(msg, flush=True)

    return log_line


def has_split(root: Path, split: str) -> bool:
    return all(
        (root / f / split).is_dir() or (root / f / "annotations" / f"instances_{split}2017.json").is_file()
        for f in FOLDERS.values()
    )


def _check_device(device: str) -> None:
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device torch knows") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")


def _data_root(config: BenchmarkConfig, log: Callable[[str], None]) -> Path:
    if config.data.synthetic is None:
        return Path(config.data.root)
    t0 = time.perf_counter()
    root = generate(config.data.synthetic, progress=not config.quiet)
    log(f"synthetic data: {root} ({time.perf_counter() - t0:.0f} s)")
    return root


def _ddp_wrap(model: nn.Module) -> nn.Module:
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)


@dataclass
class Workspace:
    """A configuration with its data in place (``config.eval_split`` and the data hash set)."""

    config: BenchmarkConfig
    root: Path
    tasks: dict[str, BenchmarkTask]
    log: Callable[[str], None]

    def make_model(self) -> UnifiedOneHead:
        """A fresh one-head model with the output of every task of the run's stages, the configured width
        and backbone."""
        p, backbone = self.config.profile, self.config.backbone
        return UnifiedOneHead(
            det_classes=self.tasks["det"].num_classes,
            seg_classes=self.tasks["seg"].num_classes,
            cls_classes=self.tasks["cls"].num_classes,
            width=p.width,
            backbone_weights=backbone.path,
            pretrained=backbone.kind == "pretrained",
            tasks=self.config.tasks,
        )

    @property
    def stages(self) -> list[Stage]:
        c, p = self.config, self.config.profile
        per_task = (c.per_stage(p.stage_lr), c.per_stage(p.stage_warmup, 0), c.per_stage(p.baseline_lr))
        parts = zip(c.tasks, c.steps, *per_task, p.stage_settings)
        return [Stage(t, n, lr, dict(s), warmup_steps=w, baseline_lr=b) for t, n, lr, w, b, s in parts]

    @property
    def run_settings(self) -> RunSettings:
        c = self.config
        progress = not c.quiet and rank_and_world()[0] == 0
        return RunSettings(batch_size=c.profile.batch_size, bn=c.bn, resamples=c.profile.resamples, device=c.device,
                           amp=c.amp, channels_last=c.channels_last, progress=progress)  # fmt: skip

    def _joint_weights(self) -> tuple[float, ...] | None:
        weights = self.config.profile.joint_weights
        return None if weights is None else self.config.per_stage(weights)

    def seed_run(self, seed: int) -> SeedRun:
        wrap = _ddp_wrap if rank_and_world()[1] > 1 else (lambda m: m)
        store = UnitStore(self.config.out, seed, self.log)
        return SeedRun(self.make_model, self.tasks, self.stages, self.run_settings, store,
                       baseline_lr=self.config.settings["lr"], wrap=wrap,
                       joint_schedule=self.config.profile.joint_schedule,
                       joint_weights=self._joint_weights(),
                       joint_lr=self.config.profile.joint_lr, feature_modules=("neck",))  # fmt: skip


def _check_backbone(config: BenchmarkConfig) -> None:
    """ImageNet weights asked for are there (online, or in the hub's cache) before any work starts."""
    if config.backbone.kind == "pretrained":
        make_backbone(pretrained=True)


def open_workspace(config: BenchmarkConfig) -> Workspace:
    """The data in place (generated when synthetic), the evaluation split chosen (val for a tune, else
    test where the data has one), the output folder checked for a resumable run, the tasks loaded."""
    log = logger(config.quiet)
    _check_device(config.device)
    _check_backbone(config)
    root = _data_root(config, log)
    split = "val" if config.mode == "tune" or not has_split(root, "test") else "test"
    data = replace(config.data, hash=data_hash(root, FOLDERS.values()))
    config = replace(config, eval_split=split, data=data)
    check_resume(config)
    tasks = make_tasks(root, eval_split=split, size=config.profile.size, seed=0, categories=config.categories)
    for t in tasks.values():
        if t.class_source not in ("given", "the data's manifest"):
            source = f"{t.class_source}: " if t.class_source else ""
            log(f"{t.title} classes: {source}{', '.join(t.class_names)}")
    return Workspace(config, root, tasks, log)
