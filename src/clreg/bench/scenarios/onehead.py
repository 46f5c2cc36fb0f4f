"""The one-head scenario: the one-head benchmark's three tasks (:mod:`clreg.onehead`) as a harness
scenario, so that every registered method runs on them through :mod:`clreg.bench`.

Tasks ``seg`` (mIoU), ``det`` (mAP@0.5) and ``cls`` (Top-1) are the benchmark's own
(:class:`~clreg.onehead.tasks.BenchmarkTask`: data, per-sample loss, spec, metric), read from
``data_root`` (``None``: the profile's synthetic world, generated once into the cache) at the
profile's input size. The model is :class:`~clreg.onehead.model.UnifiedOneHead` with the outputs of
the stages' tasks, at the profile's width and backbone (the shipped pretext backbone for ``quick``, a
random one for ``tiny``). A stage is the profile's steps for its task at the baseline's learning rate
for that task, in batches of the profile's size; a stage after another first puts its task's output
rows back at their prior (the benchmark's ``prepare``). Features for ``fd`` are the neck's; DER stores
and matches every output the tasks select (:meth:`OneHeadScenario.output_specs`).

The protocol is the harness's (:mod:`clreg.bench.runner`: Adam at a constant learning rate after the
warmup, every method trained from the start, consolidation on the training data as the stage draws
it), not the benchmark's own (:mod:`clreg.onehead.protocol`: AdamW on a cosine schedule, stage 1
trained once for every method, consolidation on the training images with the evaluation transform),
so its scores are not the published one-head report's. Its use is to run the methods that protocol
does not (DER, A-GEM, RWalk, L2-SP) on the same tasks, beside the ones it does. DER++ and ER-ACE are
left out of its method list: their label terms read a target as class indices of one output tensor,
and the one-head model's outputs are a dict of three tasks' maps.

Example:
    >>> from clreg.bench import make_scenario
    >>> s = make_scenario("onehead", profile="tiny")
    >>> [(st.task, st.steps) for st in s.stages(["det", "seg", "cls"])]
    [('det', 3), ('seg', 3), ('cls', 3)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from ...onehead.experiments.workspace import has_split
from ...onehead.model import UnifiedOneHead
from ...onehead.pretext import shipped_backbone
from ...onehead.profiles import PROFILES, Profile
from ...onehead.synthetic import generate
from ...onehead.tasks import TASK_NAMES, BenchmarkTask, make_tasks
from ...spec import OutputSpec, TaskSpec
from ..scenario import DEFAULT_METHODS, Scenario, Stage
from ..stats import Metric
from ..task import Task, check_split

__all__ = ["OneHeadScenario", "OneHeadTask"]

_LABEL_PARTS = {"derpp", "er_ace"}  # their label terms read class indices of one output tensor


class OneHeadTask(Task):
    """One of the benchmark's tasks under the harness (see the module)."""

    def __init__(self, scenario: OneHeadScenario, name: str) -> None:
        self._scenario = scenario
        self.name = name

    def _task(self, split: str) -> BenchmarkTask:
        return self._scenario.loaded(split)[self.name]

    @property
    def chance(self) -> float:  # type: ignore[override]
        return self._task("train").chance

    def data(self, split: str) -> Dataset:
        check_split(split)
        task = self._task(split)
        return task.train_data if split == "train" else task.eval_data

    def loss(self, outputs: Any, target: Any) -> Tensor:
        return self._task("train").loss(outputs, target).float().mean()

    def spec(self) -> TaskSpec:
        return self._task("train").spec

    def evaluate(self, model: nn.Module, split: str) -> Metric:
        check_split(split)
        if split == "train":
            raise ValueError("the one-head tasks score the val or test split, not train")
        return self._task(split).evaluate(model, batch_size=self._scenario.batch_size)

    def prepare(self, model: nn.Module) -> None:
        self._task("train").prepare(model)


class OneHeadScenario(Scenario):
    """The one-head benchmark's tasks on the harness (see the module)."""

    name = "onehead"
    feature_modules = ("neck",)

    def __init__(self, profile: str = "quick", data_root: str | None = None) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
        if data_root is not None and not Path(data_root).is_dir():
            raise ValueError(f"data_root {data_root!r} is not a folder")
        self.options: dict[str, Any] = {"profile": profile, "data_root": data_root}
        self.profile: Profile = PROFILES[profile]
        self.batch_size = self.profile.batch_size
        self._loaded: dict[str, dict[str, BenchmarkTask]] = {}
        self._tasks = {name: OneHeadTask(self, name) for name in TASK_NAMES}

    @cached_property
    def root(self) -> Path:
        """The data root: ``data_root``, else the profile's synthetic world (generated on first use)."""
        if self.options["data_root"] is not None:
            return Path(self.options["data_root"])
        return generate(self.profile.synthetic)

    def loaded(self, split: str) -> dict[str, BenchmarkTask]:
        """The benchmark's tasks with ``split`` as their evaluation data (``"train"``: any split's, for
        the training data), loaded once."""
        if split == "train":
            split = next((s for s in ("val", "test") if s in self._loaded or has_split(self.root, s)), "val")
        if split not in self._loaded:
            if not has_split(self.root, split):
                raise ValueError(f"the data in {self.root} has no {split!r} split")
            self._loaded[split] = make_tasks(self.root, eval_split=split, size=self.profile.size, seed=0)
        return self._loaded[split]

    @property
    def tasks(self) -> Mapping[str, OneHeadTask]:
        return self._tasks

    @property
    def methods(self) -> tuple[str, ...]:  # type: ignore[override]
        """Every method but those with a label term over one output tensor (DER++, ER-ACE)."""
        return tuple(m for m in DEFAULT_METHODS if not _LABEL_PARTS & set(m.split("+")))

    @property
    def defaults(self) -> dict[str, float]:  # type: ignore[override]
        """The profile's method settings (its learning rates are the stages')."""
        return {k: float(v) for k, v in self.profile.settings.items() if k != "lr"}

    @property
    def tune_grid(self) -> dict[str, tuple[float, ...]]:  # type: ignore[override]
        """The profile's grid for the methods (its baselines' and joint reference's keys left out)."""
        return {k: v for k, v in self.profile.tune_grid.items() if not k.startswith(("baseline.", "joint."))}

    @property
    def tuned_key(self) -> str:
        """``onehead-<profile>``: no tune of this protocol is shipped, so a report runs with the
        profile's settings and says no tune seeds."""
        return f"onehead-{self.options['profile']}"

    def _stage_lr(self, task: str) -> float:
        p = self.profile
        return float(p.baseline_lr.get(task, p.stage_lr.get(task, p.settings.get("lr", 1e-3))))

    def default_stages(self) -> list[Stage]:
        p = self.profile
        return [
            Stage(t, steps=p.steps[t], lr=self._stage_lr(t), warmup=p.stage_warmup.get(t, 0), settings=dict(s))
            for t, s in zip(TASK_NAMES, p.stage_settings, strict=True)
        ]

    def output_specs(self, tasks: Sequence[Task]) -> list[OutputSpec]:
        """Each output the tasks' specs select (segmentation's map, detection's heatmap and boxes,
        classification's logits), plainly: DER matches every one of them."""
        selected = dict.fromkeys(o.select for t in tasks for o in t.spec().outputs)
        return [OutputSpec(select=name) for name in selected]

    def make_model(self, tasks: Sequence[Task]) -> UnifiedOneHead:
        p, loaded = self.profile, self.loaded("train")
        return UnifiedOneHead(
            det_classes=loaded["det"].num_classes,
            seg_classes=loaded["seg"].num_classes,
            cls_classes=loaded["cls"].num_classes,
            width=p.width,
            backbone_weights=shipped_backbone() if p.backbone == "pretext" else None,
            pretrained=p.backbone == "pretrained",
            tasks=[t.name for t in tasks],
        )
