"""A method: registered parts joined by ``+`` (``ewc+lwf+replay``), with the settings they read.

Example:
    >>> from clreg.onehead.methods import Method
    >>> m = Method.parse("ewc+lwf+replay", {"ewc.lam": 10.0})
    >>> m.parts, m.within_rules, m.settings["ewc.lam"]
    (('ewc', 'lwf', 'replay'), True, 10.0)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ...regularizers import Compose, Regularizer
from ...replay import ReplayBuffer
from ...spec import TaskSpec
from .registry import DEFAULT_SETTINGS, PARTS, check_stage_settings

__all__ = ["Built", "Method", "check_settings", "parse_methods", "split_stage_key", "stage_one_trackers"]


def parse_methods(text: str) -> list[str]:
    """``"naive,ewc,ewc+lwf+replay"`` → the list of method names, each checked."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--methods needs at least one method, got {text!r}")
    for n in names:
        Method.parse(n)
    return names


def split_stage_key(key: str) -> tuple[str, int | None]:
    """``"ewc.lam@3"`` → ``("ewc.lam", 3)`` (the value for stage 3); ``"ewc.lam"`` → ``("ewc.lam", None)``."""
    base, at, stage = key.partition("@")
    if not at:
        return key, None
    if not stage.isdigit() or int(stage) < 1:
        raise ValueError(f"setting {key!r}: a stage is a number from 1, as in 'ewc.lam@3'")
    return base, int(stage)


def check_settings(settings: Mapping[str, Any]) -> dict[str, float]:
    """``settings`` as floats, every key a registered setting or ``<setting>@<stage>`` for one that may
    change per stage (else a ValueError naming it)."""
    out = {}
    for k, v in settings.items():
        base, stage = split_stage_key(k)
        if base not in DEFAULT_SETTINGS:
            raise ValueError(f"unknown setting {k!r}; known: {', '.join(sorted(DEFAULT_SETTINGS))}")
        if stage is not None:
            check_stage_settings({base: v})
        out[k] = float(v)
    return out


def stage_one_trackers(model: nn.Module) -> dict[str, Any]:
    """A fresh path tracker of every registered part that tracks the first stage (SI), on ``model``."""
    return {name: p.stage_one_tracker(model) for name, p in PARTS.items() if p.stage_one_tracker is not None}


@dataclass
class Built:
    """A method's regularizers on one model: their :class:`~clreg.Compose` (``None`` without any),
    each part's member, and the replay buffer (``None`` without replay)."""

    reg: Compose | None
    members: dict[str, Regularizer]
    buffer: ReplayBuffer | None

    def take_over(self, trackers: Mapping[str, dict[str, Any]], settings: Mapping[str, float]) -> None:
        """Members whose part tracked the first stage continue from that state."""
        for name, member in self.members.items():
            part = PARTS[name]
            if part.take_over is not None and name in trackers:
                part.take_over(member, trackers[name], settings)

    def set_stage_values(self, overrides: Mapping[str, float]) -> None:
        """Per-stage values (e.g. ``{"ewc.lam": 5.0}``) on the members they concern; others are for
        parts this method does not have."""
        check_stage_settings(overrides)
        for key, value in overrides.items():
            name = key.split(".")[0]
            if name in self.members:
                setattr(self.members[name], PARTS[name].stage_attributes[key], float(value))


@dataclass(frozen=True)
class Method:
    name: str
    parts: tuple[str, ...]
    settings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, settings: Mapping[str, Any] | None = None) -> Method:
        parts = tuple(p.strip() for p in name.split("+"))
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ValueError(f"unknown method part(s) {bad} in {name!r}; choose from {', '.join(PARTS)}, joined by '+'")
        if len(set(parts)) != len(parts):
            raise ValueError(f"method {name!r} repeats a part")
        if "naive" in parts and len(parts) > 1:
            raise ValueError(f"'naive' cannot be combined ({name!r})")
        return cls("+".join(parts), parts, {**DEFAULT_SETTINGS, **check_settings(settings or {})})

    def with_settings(self, settings: Mapping[str, Any]) -> Method:
        return Method(self.name, self.parts, {**self.settings, **check_settings(settings)})

    @property
    def within_rules(self) -> bool:
        """Whether every part is one of the challenge's allowed remedies (EWC, LwF, replay)."""
        return all(PARTS[p].within_rules for p in self.parts)

    @property
    def uses_replay(self) -> bool:
        return any(PARTS[p].replay_buffer is not None for p in self.parts)

    def relevant_settings(self) -> dict[str, float]:
        """The settings this method reads (its parts', per-stage ones included, and ``lr``)."""
        return {k: v for k, v in self.settings.items() if k == "lr" or k.split(".")[0] in self.parts}

    def stage_values(self, stage: int, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
        """The value of every per-stage setting of this method's parts in stage ``stage`` (1-based):
        ``"<setting>@<stage>"`` where the method sets it, else the stage's own value (``overrides``, a
        profile's per-stage settings), else the method's ``"<setting>"``. Every stage sets each of them,
        so none is carried over from the state the previous stage saved.

        Example:
            >>> m = Method.parse("ewc", {"ewc.lam": 1.0, "ewc.lam@2": 10.0})
            >>> m.stage_values(2), m.stage_values(3), m.stage_values(3, {"ewc.lam": 5.0})
            ({'ewc.lam': 10.0}, {'ewc.lam': 1.0}, {'ewc.lam': 5.0})
        """
        out = {k: float(self.settings[k]) for p in self.parts for k in PARTS[p].stage_attributes}
        out.update({k: float(v) for k, v in (overrides or {}).items() if k in out})
        for k, v in self.relevant_settings().items():
            base, at = split_stage_key(k)
            if at == stage:
                out[base] = float(v)
        return out

    def task_weights(self, values: Mapping[str, float]) -> dict[str, float]:
        """Per part whose per-task strength is on (e.g. ``ewc.per_task = 1``): the weight w_t of the task
        it consolidates before the stage whose per-stage ``values`` are given (that stage's λ)."""
        out = {}
        for p in self.parts:
            part = PARTS[p]
            if part.per_task(self.settings):
                out[p] = float(values[part.per_task_strength[1]])  # type: ignore[index]
        return out

    def member_spec(self, part: str, spec: TaskSpec, values: Mapping[str, float]) -> TaskSpec:
        """The task spec part ``part`` consolidates with: weighted by :meth:`task_weights`, and without
        the per-sample loss where the part's likelihood switch is on (its Fisher then draws labels)."""
        w = self.task_weights(values).get(part)
        if w is not None:
            spec = replace(spec, weight=spec.weight * w)
        if PARTS[part].likelihood(self.settings) and spec.per_sample_loss is not None:
            spec = replace(spec, per_sample_loss=None)
        return spec

    def attribute_values(self, values: Mapping[str, float]) -> dict[str, float]:
        """The per-stage values as the regularizers take them: a strength that weighs its task
        (:meth:`task_weights`) leaves the regularizer's own strength at 1."""
        out = dict(values)
        for p in self.task_weights(values):
            out[PARTS[p].per_task_strength[1]] = 1.0  # type: ignore[index]
        return out

    def key(self, stage_settings: Sequence[Mapping[str, float]], start: str = "stage1", upto: int | None = None) -> str:
        """The method's name and a digest of the settings it reads, the per-stage overrides and the
        first-stage unit it starts from, so units of other settings never mix and changing one
        method's settings reuses everything else. With ``upto`` (a 1-based stage), settings of later
        stages (``"<setting>@<k>"``, k > upto) are left out, so a stage is shared by the settings
        that differ only after it."""
        off = {k for p in self.parts for k in PARTS[p].off_by_default}
        settings = {
            k: v
            for k, v in self.relevant_settings().items()
            if (upto is None or (split_stage_key(k)[1] or 0) <= upto) and not (k in off and v == 0.0)
        }
        stages = [dict(s) for s in stage_settings][: upto if upto is not None else None]
        parts: list[Any] = [settings, stages]
        blob = json.dumps(parts + ([start] if start != "stage1" else []), sort_keys=True)
        return f"{self.name}@{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

    def build(self, model: nn.Module, seed: int = 0) -> Built:
        """The method's regularizers on ``model`` and its replay buffer."""
        members = {}
        for p in self.parts:
            make = PARTS[p].regularizer
            if make is not None:
                members[p] = make(model, self.settings, seed)
        buffers = [PARTS[p].replay_buffer(self.settings, seed) for p in self.parts if PARTS[p].replay_buffer]
        return Built(Compose(*members.values()) if members else None, members, buffers[0] if buffers else None)
