"""A method: registered parts joined by ``+`` (``ewc+lwf+replay``) with their typed settings.

:meth:`Method.parse` takes the method's name and a mapping of settings (names as in
:mod:`clreg.bench.settings`); settings of parts the method does not have, or scoped to another method
(``lwf:lwf.alpha``), are checked and left out, so one mapping serves every method of a run. Each stage's
effective values (:meth:`Method.stage_values`) are the method's ``<setting>@<stage>``, else the stage's
own value, else the method's ``<setting>``: a value never carries over from the stage before.

Example:
    >>> from clreg.bench.method import Method
    >>> m = Method.parse("ewc+lwf", {"ewc.lam": 10.0, "ewc.lam@3": 100.0, "mas.lam": 5.0, "lr": 1e-3})
    >>> [p.name for p in m.parts], m.lr, m.part("ewc").lam
    (['ewc', 'lwf'], 0.001, 10.0)
    >>> m.stage_values(2)["ewc"], m.stage_values(3)["ewc"]
    ({'lam': 10.0}, {'lam': 100.0})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .parts import PARTS, Part, ReplayPart, coerce
from .settings import SettingKey, parse_settings

__all__ = ["COMMON_SETTINGS", "Method", "check_method_name", "check_settings", "check_stage_key"]

COMMON_SETTINGS: dict[str, type] = {"lr": float}
"""Settings with no part, read by every method (``lr``: the learning rate of every stage)."""


def check_method_name(name: str) -> tuple[str, ...]:
    """``"ewc+lwf"`` → its parts' names, each registered, none repeated, ``naive`` alone."""
    if not isinstance(name, str):
        raise TypeError(f"a method's name is a str, got {type(name).__name__}")
    parts = tuple(p.strip() for p in name.split("+"))
    bad = [p for p in parts if p not in PARTS]
    if bad or not name.strip():
        raise ValueError(f"unknown method part(s) {bad} in {name!r}; choose from {', '.join(PARTS)}, joined by '+'")
    if len(set(parts)) != len(parts):
        raise ValueError(f"method {name!r} repeats a part")
    if "naive" in parts and len(parts) > 1:
        raise ValueError(f"'naive' cannot be combined ({name!r})")
    return parts


def _check_key(key: SettingKey) -> None:
    """A ValueError unless ``key`` names a registered setting that may take ``key.stage`` if it has one."""
    if key.method is not None:
        check_method_name(key.method)
    if not key.part:
        if key.name not in COMMON_SETTINGS:
            raise ValueError(f"unknown setting {key}; common settings: {', '.join(COMMON_SETTINGS)}")
        return
    part = PARTS.get(key.part)
    if part is None:
        raise ValueError(f"setting {key}: no part named {key.part!r}; parts: {', '.join(PARTS)}")
    if key.name not in part.fields():
        raise ValueError(f"unknown setting {key}; {key.part} has: {', '.join(part.fields()) or 'none'}")
    if key.stage is not None and key.name not in part.per_stage:
        settable = [f"{key.part}.{f}" for f in part.per_stage]
        raise ValueError(f"setting {key.base} cannot change between stages; of {key.part}'s, these can: {settable}")


def check_stage_key(key: SettingKey) -> None:
    """A ValueError unless ``key`` names a registered setting that may change between stages (what a
    stage's own settings may hold; the learning rate is the stage's ``lr``)."""
    if not key.part:
        raise ValueError(
            f"a stage's settings hold part settings (e.g. 'ewc.lam'); its learning rate is Stage.lr, got {key}"
        )
    _check_key(replace(key, stage=1))


def _kind(key: SettingKey) -> type:
    return COMMON_SETTINGS[key.name] if not key.part else PARTS[key.part].fields()[key.name]


def check_settings(settings: Mapping[str | SettingKey, Any] | None) -> dict[SettingKey, Any]:
    """``settings`` keyed by :class:`SettingKey`, each a registered setting (with a stage only where it
    may change per stage), its value converted to the setting's type; a ValueError naming the first
    that is not.

    Example:
        >>> {str(k): v for k, v in check_settings({"ewc.lam@2": "1e4", "replay.capacity": 10.0}).items()}
        {'ewc.lam@2': 10000.0, 'replay.capacity': 10}
    """
    out = {}
    for key, value in parse_settings(settings).items():
        _check_key(key)
        out[key] = coerce(value, _kind(key), str(key))
    return out


@dataclass(frozen=True)
class Method:
    """A method's parts with their settings, its learning rate (``None``: each stage's own) and its
    per-stage values (stage → {key without stage: value})."""

    name: str
    parts: tuple[Part, ...]
    lr: float | None = None
    staged: Mapping[int, Mapping[SettingKey, Any]] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, settings: Mapping[str | SettingKey, Any] | None = None) -> Method:
        """The method ``name`` with the ``settings`` that concern it (see the module)."""
        part_names = check_method_name(name)
        name = "+".join(part_names)
        values: dict[str, dict[str, Any]] = {p: {} for p in part_names}
        lr, staged = None, {}
        for key, value in parse_settings(settings).items():
            _check_key(key)
            mine = (key.method is None or "+".join(check_method_name(key.method)) == name) and (
                not key.part or key.part in values
            )
            if not mine:
                continue
            value = coerce(value, _kind(key), str(key))
            if key.stage is not None:
                staged.setdefault(key.stage, {})[key.base] = value
            elif key.part:
                values[key.part][key.name] = value
            else:
                lr = value
        parts = tuple(PARTS[p].from_values(values[p]) for p in part_names)
        return cls(name, parts, lr, staged)

    def part(self, name: str) -> Part:
        """The method's part called ``name`` (a KeyError naming the method's parts otherwise)."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"method {self.name!r} has no part {name!r}; its parts: {[p.name for p in self.parts]}")

    @property
    def within_rules(self) -> bool:
        """Whether every part is one of the one-head challenge's remedies (EWC, LwF, replay, none)."""
        return all(p.within_rules for p in self.parts)

    @property
    def replay(self) -> ReplayPart | None:
        """The replay part's settings, ``None`` without replay."""
        found = [p for p in self.parts if isinstance(p, ReplayPart)]
        return found[0] if found else None

    def stage_lr(self, stage: int, default: float) -> float:
        """Stage ``stage``'s learning rate: the method's ``lr@stage``, else its ``lr``, else ``default``."""
        at = self.staged.get(stage, {}).get(SettingKey("", "lr"))
        return float(at if at is not None else self.lr if self.lr is not None else default)

    def stage_values(self, stage: int, stage_settings: Mapping[str | SettingKey, Any] | None = None) -> dict[str, dict]:
        """Per part, the value of each of its per-stage fields in stage ``stage`` (1-based): the method's
        ``<setting>@<stage>``, else the stage's own value (``stage_settings``, a scenario's per-stage
        settings), else the method's ``<setting>``."""
        own = {k: v for k, v in parse_settings(stage_settings).items() if k.stage is None and k.method is None}
        at = self.staged.get(stage, {})
        out: dict[str, dict] = {}
        for p in self.parts:
            out[p.name] = {}
            for f in p.per_stage:
                key = SettingKey(p.name, f)
                _check_key(key)
                value = at.get(key, own.get(key, getattr(p, f)))
                out[p.name][f] = coerce(value, p.fields()[f], str(key))
        return out

    def effective(self, stages: int, stage_settings: list[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Every setting the method reads, with each per-stage setting's value in every stage: what a
        run's record holds (``{"ewc.lam": [λ@1, λ@2, λ@3], "ewc.normalize": False, "lr": …}``)."""
        stage_settings = stage_settings or [{} for _ in range(stages)]
        out: dict[str, Any] = {}
        for p in self.parts:
            for f in p.fields():
                if f in p.per_stage:
                    out[f"{p.name}.{f}"] = [
                        self.stage_values(k + 1, stage_settings[k])[p.name][f] for k in range(stages)
                    ]
                else:
                    out[f"{p.name}.{f}"] = getattr(p, f)
        return out
