"""The one-head benchmark's methods: the harness's methods (:class:`clreg.bench.method.Method`, their
parts in :mod:`clreg.bench.parts`, their settings' names parsed in :mod:`clreg.bench.settings`) as
the one-head protocol runs them.

The protocol (:mod:`clreg.onehead.protocol`) trains stage 1 once for every method, with the path
tracker of each part that builds its importance along the path (SI,
:meth:`~clreg.bench.parts.Part.first_stage_tracker`), then each method's later stages from saved
states named by :meth:`Method.key`. It runs the parts whose work is a penalty, a replay buffer or
feature hooks (:data:`ONEHEAD_PARTS`); the parts that see each step's batch (DER, ER-ACE), project the
gradient with a memory of their own (A-GEM) or follow the path from stage 1 (RWalk), and L2-SP (whose
start would be stage 1's end), run on :mod:`clreg.bench`'s scenarios.

A one-head method carries every setting as a number by name (``settings``, the defaults of
:func:`default_settings` under the given ones): the run's record, the tune's trial keys and the
units' names are made from it.

Example:
    >>> from clreg.onehead.methods import Method
    >>> m = Method.parse("ewc+lwf+replay", {"ewc.lam": 10.0})
    >>> m.parts, m.within_rules, m.settings["ewc.lam"]
    (('ewc', 'lwf', 'replay'), True, 10.0)
    >>> m.stage_values(2, {"lwf.alpha": 3.0})
    {'ewc.lam': 10.0, 'lwf.alpha': 3.0}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..bench.method import Method as HarnessMethod
from ..bench.method import check_method_name
from ..bench.method import check_settings as check_harness_settings
from ..bench.parts import PARTS, PartContext
from ..bench.settings import SettingKey
from ..regularizers import Compose, Regularizer
from ..replay import ReplayBuffer
from ..spec import TaskSpec

__all__ = [
    "DEFAULT_LR",
    "ONEHEAD_PARTS",
    "Built",
    "Method",
    "check_settings",
    "check_stage_settings",
    "default_settings",
    "parse_methods",
    "stage_one_trackers",
]

ONEHEAD_PARTS = ("naive", "ewc", "online_ewc", "si", "lwf", "mas", "kfac_ewc", "replay", "fd")
"""The parts the one-head protocol runs: a penalty, SI's path, a replay buffer and the feature hooks of
feature distillation (``fd``, on the model's neck) are what it applies."""

DEFAULT_LR = 2e-3
"""Every method's learning rate where neither the profile nor the method sets one."""

# unit keys leave these 0/1 settings out while they are 0: they were added after units were named with
# EWC's other settings, so the folder of an earlier run still finds its units
_KEY_OMITS_WHEN_OFF = ("ewc.per_task", "ewc.likelihood")


def _number(value: Any) -> float | int:
    """A setting's value as a run's record lists it: an int as itself, a flag or a float as a float."""
    return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def default_settings() -> dict[str, float | int]:
    """Every setting of :data:`ONEHEAD_PARTS` at its part's default, then ``lr``.

    Example:
        >>> s = default_settings()
        >>> s["ewc.lam"], s["replay.capacity"], list(s)[-1]
        (1.0, 10, 'lr')
    """
    out: dict[str, float | int] = {}
    for name in ONEHEAD_PARTS:
        part = PARTS[name]()
        out.update({f"{name}.{f}": _number(getattr(part, f)) for f in part.fields()})
    out["lr"] = DEFAULT_LR
    return out


def check_settings(settings: Mapping[str | SettingKey, Any]) -> dict[str, float]:
    """``settings`` as floats by name, each checked by the harness
    (:func:`clreg.bench.method.check_settings`) and read by a one-head part or ``lr`` (else a
    ValueError naming it)."""
    out = {}
    for key, value in check_harness_settings(settings).items():
        if key.method is not None:
            raise ValueError(f"setting {key}: name the method apart (METHOD:NAME on the command line)")
        if key.part and key.part not in ONEHEAD_PARTS:
            raise ValueError(f"setting {key}: the one-head benchmark runs the parts {', '.join(ONEHEAD_PARTS)}")
        if not key.part and key.stage is not None:
            raise ValueError(f"setting {key}: a stage's learning rate in the one-head benchmark is its profile's")
        out[str(key)] = float(value)
    return out


def check_stage_settings(settings: Mapping[str, Any]) -> None:
    """A profile stage's own settings name per-stage settings of one-head parts (e.g. ``ewc.lam``)."""
    for name, value in settings.items():
        key = SettingKey.parse(name)
        if not key.part or key.stage is not None:
            raise ValueError(f"a stage's settings are part settings without a stage (e.g. 'ewc.lam'), got {name!r}")
        check_settings({SettingKey(key.part, key.name, stage=1): value})  # as a stage's value


def parse_methods(text: str) -> list[str]:
    """``"naive,ewc,ewc+lwf+replay"`` → the list of method names, each checked."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--methods needs at least one method, got {text!r}")
    for n in names:
        Method.parse(n)
    return names


def stage_one_trackers(model: nn.Module) -> dict[str, Regularizer]:
    """A fresh first-stage path tracker of every one-head part that has one (SI's), on ``model``."""
    out = {}
    for name in ONEHEAD_PARTS:
        tracker = PARTS[name].first_stage_tracker(model)
        if tracker is not None:
            out[name] = tracker
    return out


def _per_part(values: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"ewc.lam": 3.0}`` → ``{"ewc": {"lam": 3.0}}``."""
    out: dict[str, dict[str, float]] = {}
    for name, value in values.items():
        key = SettingKey.parse(name)
        out.setdefault(key.part, {})[key.name] = value
    return out


@dataclass(frozen=True)
class Method:
    """A one-head method (see the module): its name, its parts' names, every setting by name (as
    floats) and the harness's parsed method."""

    name: str
    parts: tuple[str, ...]
    settings: dict[str, float]
    harness: HarnessMethod = field(repr=False, compare=False)

    @classmethod
    def parse(cls, name: str, settings: Mapping[str, Any] | None = None) -> Method:
        """The method ``name`` (parts joined by ``+``) with ``settings`` over :func:`default_settings`."""
        parts = check_method_name(name)
        others = [p for p in parts if p not in ONEHEAD_PARTS]
        if others:
            raise ValueError(
                f"the one-head benchmark runs the parts {', '.join(ONEHEAD_PARTS)}; {others} need what its "
                "protocol does not give (each step's batch, a memory of their own, stage 1's path or its "
                "start): run them on a clreg.bench scenario"
            )
        given = {k: float(v) for k, v in default_settings().items()} | check_settings(settings or {})
        return cls("+".join(parts), parts, given, HarnessMethod.parse(name, given))

    def with_settings(self, settings: Mapping[str, Any]) -> Method:
        return Method.parse(self.name, {**self.settings, **settings})

    @property
    def within_rules(self) -> bool:
        """Whether every part is one of the challenge's allowed remedies (EWC, LwF, replay)."""
        return self.harness.within_rules

    @property
    def uses_replay(self) -> bool:
        return self.harness.replay is not None

    @property
    def data_passes(self) -> int:
        """How many of its parts read the previous task's data at consolidation."""
        return sum(type(p).data_pass for p in self.harness.parts)

    def relevant_settings(self) -> dict[str, float]:
        """The settings this method reads (its parts', per-stage ones included, and ``lr``)."""
        return {k: v for k, v in self.settings.items() if SettingKey.parse(k).part in ("", *self.parts)}

    def stage_values(self, stage: int, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
        """The value of every per-stage setting of this method's parts in stage ``stage`` (1-based), by
        name: the method's ``"<setting>@<stage>"``, else the stage's own (``overrides``, a profile's
        per-stage settings), else the method's ``"<setting>"`` (:meth:`clreg.bench.method.Method.stage_values`).
        No value carries over from the state the previous stage saved."""
        nested = self.harness.stage_values(stage, overrides)
        return {f"{part}.{f}": float(v) for part, values in nested.items() for f, v in values.items()}

    def task_weights(self, values: Mapping[str, float]) -> dict[str, float]:
        """Per part whose per-task strength is on (``ewc.per_task = 1``): the weight w_t of the task it
        consolidates before the stage whose per-stage ``values`` are given (that stage's λ)."""
        nested = _per_part(values)
        out = {}
        for part in self.harness.parts:
            weight = part.task_weight(nested.get(part.name, {}))
            if weight is not None:
                out[part.name] = weight
        return out

    def member_spec(self, part: str, spec: TaskSpec, values: Mapping[str, float]) -> TaskSpec:
        """The task spec part ``part`` consolidates with (:meth:`clreg.bench.parts.Part.member_spec`)."""
        return self.harness.part(part).member_spec(spec, _per_part(values).get(part, {}))

    def key(self, stage_settings: Sequence[Mapping[str, float]], start: str = "stage1", upto: int | None = None) -> str:
        """The method's name and a digest of the settings it reads, the per-stage overrides and the
        first-stage unit it starts from, so units of other settings never mix and changing one
        method's settings reuses everything else. With ``upto`` (a 1-based stage), settings of later
        stages (``"<setting>@<k>"``, k > upto) are left out, so a stage is shared by the settings
        that differ only after it."""
        settings = {
            k: v
            for k, v in self.relevant_settings().items()
            if (upto is None or (SettingKey.parse(k).stage or 0) <= upto)
            and not (k in _KEY_OMITS_WHEN_OFF and v == 0.0)
        }
        stages = [dict(s) for s in stage_settings][: upto if upto is not None else None]
        parts: list[Any] = [settings, stages]
        blob = json.dumps(parts + ([start] if start != "stage1" else []), sort_keys=True)
        return f"{self.name}@{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

    def build(self, model: nn.Module, seed: int = 0, context: PartContext | None = None) -> Built:
        """The method's regularizers on ``model`` and its replay buffer; ``context`` names the model's
        feature modules (for ``fd``)."""
        members = {}
        for part in self.harness.parts:
            reg = part.regularizer(model, seed, context or PartContext())
            if reg is not None:
                members[part.name] = reg
        replay = self.harness.replay
        buffer = replay.replay_buffer(seed) if replay is not None else None
        return Built(self, Compose(*members.values()) if members else None, members, buffer)


@dataclass
class Built:
    """A method's regularizers on one model: their :class:`~clreg.Compose` (``None`` without any),
    each part's member, and the replay buffer (``None`` without replay)."""

    method: Method
    reg: Compose | None
    members: dict[str, Regularizer]
    buffer: ReplayBuffer | None

    def watch(self, model: nn.Module) -> AbstractContextManager:
        """The context a training step's forward runs in: every member's feature hooks (``fd``)."""
        stack = ExitStack()
        for name, member in self.members.items():
            stack.enter_context(self.method.harness.part(name).watch(member, model))
        return stack

    def take_over(self, trackers: Mapping[str, Mapping[str, Any]]) -> None:
        """Members whose part tracked the first stage continue from that state with their own settings."""
        for name, member in self.members.items():
            if name in trackers:
                self.method.harness.part(name).take_over(member, trackers[name])

    def set_stage_values(self, values: Mapping[str, float]) -> None:
        """A stage's per-stage values (:meth:`Method.stage_values`) on the members they concern, as each
        part sets them (:meth:`clreg.bench.parts.Part.attributes`: a strength that weighs its task
        leaves the member's own at 1)."""
        nested = _per_part(values)
        for name, member in self.members.items():
            for attr, value in self.method.harness.part(name).attributes(nested.get(name, {})).items():
                setattr(member, attr, value)
