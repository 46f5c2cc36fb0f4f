"""The benchmark's configuration: a :class:`RunRequest` (what a user asks: a profile and overrides)
resolved into a :class:`BenchmarkConfig` (every value a run uses), which is written to
``config.json`` and ``results.json`` and compared with the saved one when a run resumes.

Example:
    >>> from clreg.onehead.config import RunRequest, resolve
    >>> cfg = resolve(RunRequest(profile="tiny", methods="naive,ewc+lwf", sets={"ewc.lam": 3.0}))
    >>> cfg.methods, cfg.settings["ewc.lam"], cfg.steps
    (('naive', 'ewc+lwf'), 3.0, (3, 3, 3))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..bench.settings import SettingKey
from ..distributed import rank_and_world
from .methods import Method, check_settings, check_stage_settings, default_settings, parse_methods
from .pretext import SHIPPED_BACKBONE, SHIPPED_BACKBONE_IN_PACKAGE, shipped_backbone
from .profiles import QUICK_SETTINGS_PROVENANCE, Profile, get_profile, with_tuned
from .synthetic import SyntheticConfig
from .tasks import FOLDERS, TASK_NAMES

__all__ = [
    "Backbone",
    "BenchmarkConfig",
    "DataSource",
    "RunRequest",
    "check_resume",
    "resolve",
    "seeds_shared_with_tune",
]

MODES = ("run", "baselines", "tune")
# not compared when resuming: where it runs, how many seeds (each seed's units are separate), which
# methods and their settings (a method's units are keyed by its name and settings; the baselines'
# learning rate is compared as "baseline_lr") and whether the joint reference is run
IGNORED_ON_RESUME = (
    "device",
    "workers",
    "seeds",
    "methods",
    "within_rules",
    "joint",
    "settings",
    "method_settings",
    "settings_provenance",
)
PRETEXT_DESCRIPTION = (
    "the shipped synthetic-pretext backbone (clreg.onehead.pretext: a dense map of which of the 10 shape "
    "kinds is where, on 15 000 images from seeds disjoint from the tasks'; the kinds overlap the tasks' vocabulary)"
)


@dataclass(frozen=True)
class RunRequest:
    """What a user asks for: a profile and the overrides of the command line (or of a script)."""

    profile: str = "quick"
    methods: str | None = None  # comma-separated, '+' joins a combination; None: the profile's
    data_root: str | None = None  # None: the synthetic default
    backbone_weights: str | None = None
    pretrained: bool = False
    random_init: bool = False
    device: str = "cpu"
    amp: bool = False
    out: str | None = None  # None: onehead-results/<profile>[-tune]
    seeds: int | None = None  # None: the profile's (a run's seeds, or a tune's own)
    first_seed: int | None = None  # seeds first_seed … first_seed + seeds − 1 (another process may run the others)
    steps: int | None = None  # every stage's budget; None: the profile's
    stages: tuple[str, ...] | None = None  # the tasks in stage order; None: seg, det, cls
    bn: str = "train"
    sets: Mapping[str, float] = field(default_factory=dict)  # method settings: "NAME" or "METHOD:NAME" -> value
    joint: bool = True
    mode: str = "run"  # "run", "baselines" (the single-task baselines only) or "tune"
    quiet: bool = False
    categories: tuple[str, ...] | None = None  # the detection categories by name; None: the data's
    workers: int | None = None  # processes that train a run's units at once; None: the profile's
    settings_from: str | None = None  # a tune.json whose choices replace the profile's
    recorded_only: bool = False  # a tune that trains nothing: its report from the recorded results


@dataclass(frozen=True)
class Backbone:
    kind: str  # "file", "pretrained" or "random"
    path: str | None = None
    description: str = ""

    def record(self) -> dict[str, Any]:
        """The backbone as a run's record holds it; the shipped one by its place in the package, so a
        record made in one checkout compares equal in another."""
        if self.path is not None and Path(self.path) == SHIPPED_BACKBONE:
            return {"kind": self.kind, "path": SHIPPED_BACKBONE_IN_PACKAGE}
        return {"kind": self.kind} | ({"path": self.path} if self.path is not None else {})


@dataclass(frozen=True)
class DataSource:
    kind: str  # "synthetic" or "folder"
    root: str | None = None
    synthetic: SyntheticConfig | None = None
    hash: str | None = None  # of the file names and sizes, once the data is there

    @property
    def description(self) -> str:
        if self.synthetic is not None:
            return f"synthetic default (generator {self.synthetic.key()})"
        return f"data root {self.root}"

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.synthetic is not None:
            out["synthetic"] = asdict(self.synthetic) | {"key": self.synthetic.key()}
        else:
            out["root"] = self.root
        out["description"] = self.description
        return out | ({"hash": self.hash} if self.hash is not None else {})


@dataclass(frozen=True)
class BenchmarkConfig:
    """Every value a run uses, resolved from a profile and a request."""

    profile: Profile
    methods: tuple[str, ...]
    settings: dict[str, float]  # every method's, unless method_settings says otherwise
    settings_provenance: str
    steps: tuple[int, ...]
    bn: str
    seeds: tuple[int, ...]
    backbone: Backbone
    data: DataSource
    device: str
    amp: bool
    joint: bool
    mode: str
    out: Path
    quiet: bool = False
    channels_last: bool = True
    eval_split: str | None = None  # known once the data is there
    categories: tuple[str, ...] | None = None  # the detection categories by name; None: the data's
    method_settings: dict[str, dict[str, float]] = field(default_factory=dict)  # per method, over settings
    workers: int = 1  # processes that train a run's units at once
    stage_tasks: tuple[str, ...] = TASK_NAMES  # the tasks in stage order
    recorded_only: bool = False  # a tune that trains nothing (its progress record's results only)

    def settings_for(self, method: str) -> dict[str, float]:
        """The settings method ``method`` runs with: the shared ones, then its own."""
        return {**self.settings, **self.method_settings.get(method, {})}

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks in stage order."""
        return self.stage_tasks

    def per_stage(self, per_task: Mapping[str, Any], default: Any = None) -> tuple[Any, ...]:
        """A profile's per-task values (task → value) in this run's stage order (``default`` for a task
        without one)."""
        return tuple(per_task.get(t, default) for t in self.stage_tasks)

    @property
    def within_rules(self) -> dict[str, bool]:
        return {m: Method.parse(m).within_rules for m in self.methods}

    def record(self) -> dict[str, Any]:
        """The configuration as ``results.json`` holds it."""
        p = self.profile
        out = {
            "profile": p.name,
            "tasks": list(self.tasks),
            "methods": list(self.methods),
            "within_rules": self.within_rules,
            "settings": dict(self.settings),
            **({"method_settings": self.method_settings} if self.method_settings else {}),
            "baseline_lr": self.settings["lr"],
            "settings_provenance": self.settings_provenance,
            "stage_settings": [dict(s) for s in p.stage_settings[: len(self.tasks)]],
            "stage_lr": list(self.per_stage(p.stage_lr)),
            "stage_warmup": list(self.per_stage(p.stage_warmup, 0)),
            **({"stage_baseline_lr": list(self.per_stage(p.baseline_lr))} if p.baseline_lr else {}),
            "steps": list(self.steps),
            "batch_size": p.batch_size,
            "size": p.size,
            "width": p.width,
            "bn": self.bn,
            "seeds": list(self.seeds),
            "workers": self.workers,
            **({"tune_seeds": list(p.tuned_on)} if p.tuned_on is not None else {}),
            "backbone": self.backbone.record(),
            "backbone_description": self.backbone.description,
            "data": self.data.record(),
            "device": self.device,
            "amp": self.amp,
            "channels_last": self.channels_last,
            "joint": self.joint,
            "joint_schedule": p.joint_schedule,
            **({"joint_weights": list(self.per_stage(p.joint_weights))} if p.joint_weights is not None else {}),
            **({"joint_lr": p.joint_lr} if p.joint_lr is not None else {}),
            "resamples": p.resamples,
            "tune": self.mode == "tune",
        }
        out |= {"categories": list(self.categories)} if self.categories is not None else {}
        return out | ({"eval_split": self.eval_split} if self.eval_split is not None else {})

    def comparable(self) -> dict[str, Any]:
        """What must equal the saved configuration for a run to resume (as JSON would give it back)."""
        return json.loads(json.dumps({k: v for k, v in self.record().items() if k not in IGNORED_ON_RESUME}))


def _check_counts(req: RunRequest) -> None:
    if req.seeds is not None and req.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {req.seeds}")
    if req.first_seed is not None and req.first_seed < 0:
        raise ValueError(f"--first-seed must be >= 0, got {req.first_seed}")
    if req.workers is not None and (not isinstance(req.workers, int) or req.workers < 1):
        raise ValueError(f"--workers must be an int >= 1, got {req.workers!r}")
    if req.steps is not None and req.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {req.steps}")
    if req.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {req.mode!r}")
    if req.recorded_only and req.mode != "tune":
        raise ValueError("--recorded-only applies to a --tune")
    if req.bn not in ("train", "freeze"):
        raise ValueError(f"bn must be 'train' or 'freeze', got {req.bn!r}")
    if sum(map(bool, (req.backbone_weights, req.pretrained, req.random_init))) > 1:
        raise ValueError("give at most one of --backbone-weights, --pretrained and --random-init")


def _backbone(req: RunRequest, prof: Profile) -> Backbone:
    if req.backbone_weights:
        path = Path(req.backbone_weights)
        if not path.is_file():
            raise ValueError(f"--backbone-weights: no such file {req.backbone_weights}")
        return Backbone("file", str(path.resolve()), f"local weights {req.backbone_weights}")
    if req.pretrained:
        return Backbone("pretrained", description="ImageNet weights from timm's hub")
    if req.random_init or prof.backbone == "random":
        return Backbone("random", description="random initialisation")
    return Backbone("file", str(shipped_backbone()), PRETEXT_DESCRIPTION)


def _data(req: RunRequest, prof: Profile) -> DataSource:
    if not req.data_root:
        return DataSource("synthetic", synthetic=prof.synthetic)
    root = Path(req.data_root)
    if not root.is_dir():
        raise ValueError(f"--data-root: no such folder {root}")
    missing = [f for f in FOLDERS.values() if not (root / f).is_dir()]
    if missing:
        raise ValueError(f"--data-root {root} lacks {missing}; expected {sorted(FOLDERS.values())}")
    return DataSource("folder", str(root.resolve()))


def _provenance(prof: Profile, sets: Mapping[str, float], tuned: str | None = None) -> str:
    base = QUICK_SETTINGS_PROVENANCE if prof.name == "quick" else f"the {prof.name} profile's fixed values"
    if tuned is not None:
        base = f"chosen by the tune in {tuned} (its baselines' learning rates, joint reference and methods' values)"
    if prof.tune_incomplete:
        base += (
            f"; the tune's search did not finish for {', '.join(prof.tune_incomplete)}: "
            "their values are where it had got to (each key searched so far at its best recorded value)"
        )
    return base + (f"; overridden by --set {', '.join(f'{k}={v:g}' for k, v in sets.items())}" if sets else "")


def _tuned(path: str | None) -> tuple[str, dict[str, Any]] | None:
    """``(description, report)`` of the tune.json at ``path`` (its split and date), or None."""
    if path is None:
        return None
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--settings-from {path}: cannot read a tune.json ({err})") from None
    if not isinstance(report, dict):
        raise ValueError(f"--settings-from {path}: not a tune.json")
    date = report.get("provenance", {}).get("date", "undated")
    return f"{path} ({report.get('split', 'val')} split, {date})", report


def _split_sets(sets: Mapping[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``--set`` values: ``NAME`` for every method, ``METHOD:NAME`` for one (each checked)."""
    shared: dict[str, float] = {}
    own: dict[str, dict[str, float]] = {}
    for text, value in sets.items():
        key = SettingKey.parse(text)
        if key.method is None:
            shared |= check_settings({text: value})
            continue
        try:
            method = Method.parse(key.method).name
        except ValueError as err:
            raise ValueError(f"--set {text}: {err}") from None
        name = str(SettingKey(key.part, key.name, key.stage))
        own.setdefault(method, {}).update(check_settings({name: value}))
    return shared, own


def _merge_method_settings(*layers: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for layer in layers:
        for method, values in layer.items():
            out.setdefault(method, {}).update(values)
    return out


def _categories(names: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    names = tuple(n.strip() for n in names if n.strip())
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--categories needs distinct category names, got {list(names)}")
    return names


def resolve(req: RunRequest) -> BenchmarkConfig:
    """The configuration a request asks for; a ValueError names what is wrong with it."""
    _check_counts(req)
    prof = get_profile(req.profile)
    if req.mode == "tune":
        if req.settings_from is not None:
            raise ValueError("--settings-from does not go with --tune: a tune starts from the profile's own values")
        prof = prof.before_tune()
    tuned_from = _tuned(req.settings_from)
    if tuned_from is not None:
        try:
            prof = with_tuned(prof, tuned_from[1], TASK_NAMES)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"--settings-from {req.settings_from}: {err}") from None
    if req.steps is not None:
        prof = replace(prof, steps=dict.fromkeys(TASK_NAMES, req.steps))
    stage_tasks = _stage_tasks(req.stages)
    try:
        asked = req.methods or prof.methods
        methods = parse_methods((prof.all_methods or prof.methods) if asked.strip() == "all" else asked)
    except ValueError as err:
        raise ValueError(f"--methods: {err}") from None
    check_settings(prof.settings)
    for overrides in prof.stage_settings:
        check_stage_settings(overrides)
    for overrides in prof.method_settings.values():
        check_settings(overrides)
    shared, own = _split_sets(req.sets)
    default_out = Path("onehead-results") / (prof.name + ("-tune" if req.mode == "tune" else ""))
    return BenchmarkConfig(
        profile=prof,
        methods=tuple(methods),
        settings={**default_settings(), **prof.settings, **shared},
        method_settings=_merge_method_settings(prof.method_settings, own),
        settings_provenance=_provenance(prof, req.sets, None if tuned_from is None else tuned_from[0]),
        steps=tuple(prof.steps[t] for t in stage_tasks),
        stage_tasks=stage_tasks,
        bn=req.bn,
        seeds=_seeds(req, prof),
        backbone=_backbone(req, prof),
        data=_data(req, prof),
        device=req.device,
        amp=bool(req.amp),
        joint=req.joint,
        mode=req.mode,
        out=Path(req.out) if req.out else default_out,
        quiet=req.quiet,
        categories=_categories(req.categories),
        workers=_workers(req, prof),
        recorded_only=req.recorded_only,
    )


def _workers(req: RunRequest, prof: Profile) -> int:
    """``--workers``, else the profile's, at most one per thread torch may use (a tune: one process)."""
    if req.workers is not None:
        return req.workers
    return 1 if req.mode == "tune" else max(1, min(prof.workers, torch.get_num_threads()))


def _stage_tasks(stages: tuple[str, ...] | None) -> tuple[str, ...]:
    """The tasks in stage order: each of :data:`~clreg.onehead.tasks.TASK_NAMES` at most once."""
    if stages is None:
        return TASK_NAMES
    names = tuple(s.strip() for s in stages if s.strip())
    unknown = [s for s in names if s not in TASK_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--stages names each of {', '.join(TASK_NAMES)} at most once, got {','.join(stages)}")
    return names


def _seeds(req: RunRequest, prof: Profile) -> tuple[int, ...]:
    """The training seeds: ``first_seed`` … ``first_seed + seeds − 1`` where either is given; else a
    tune's own (``prof.tune_seeds``) or a run's 0 … ``prof.seeds`` − 1."""
    if req.seeds is None and req.first_seed is None:
        return tuple(prof.tune_seeds) if req.mode == "tune" else tuple(range(prof.seeds))
    first = req.first_seed or 0
    return tuple(range(first, first + (req.seeds or 1)))


def seeds_shared_with_tune(config: BenchmarkConfig) -> list[int]:
    """The run's seeds that the tune whose choices it carries trained on (empty for a tune itself)."""
    if config.mode == "tune" or config.profile.tuned_on is None:
        return []
    return sorted(set(config.seeds) & set(config.profile.tuned_on))


def check_resume(config: BenchmarkConfig) -> None:
    """Refuse an output folder that holds a run of another configuration; start ``config.json`` in a
    new one (rank 0)."""
    saved = config.out / "config.json"
    comparable = config.comparable()
    if saved.is_file():
        old = {k: v for k, v in json.loads(saved.read_text()).items() if k not in IGNORED_ON_RESUME}
        if comparable != old:
            diff = sorted(k for k in set(old) | set(comparable) if old.get(k) != comparable.get(k))
            raise ValueError(
                f"{config.out} holds a run with another configuration (differs in {diff}); "
                "choose another --out or remove it"
            )
    elif rank_and_world()[0] == 0:
        config.out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(comparable, indent=1))
