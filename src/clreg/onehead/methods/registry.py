"""The registry of method parts: each remedy by name, with the settings it reads and what it builds.

A :class:`Part` declares its settings (``"<part>.<name>"`` → default), whether it is one of the
challenge's allowed remedies, how it builds its regularizer (or replay buffer), which of its
settings may change between stages and the attribute each sets, and, where it has one, the
capability of tracking the optimizer's path during the unregularized first stage (SI's path
integral) and of taking that state over. :func:`register_part` adds one; every setting of every
part, and ``lr``, make :data:`DEFAULT_SETTINGS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...regularizers import Regularizer
from ...replay import ReplayBuffer

__all__ = ["COMMON_SETTINGS", "DEFAULT_SETTINGS", "PARTS", "Part", "check_stage_settings", "register_part"]

Settings = Mapping[str, float]


@dataclass(frozen=True)
class Part:
    """One remedy a method is made of."""

    name: str
    settings: Mapping[str, float] = field(default_factory=dict)  # "<name>.<setting>" -> default
    within_rules: bool = True  # one of the challenge's remedies (EWC, LwF, replay, or none)
    regularizer: Callable[[nn.Module, Settings, int], Regularizer] | None = None  # (model, settings, seed)
    replay_buffer: Callable[[Settings, int], ReplayBuffer] | None = None  # (settings, seed)
    stage_attributes: Mapping[str, str] = field(default_factory=dict)  # per-stage setting -> attribute
    stage_one_tracker: Callable[[nn.Module], Any] | None = None  # tracks the path in stage 1
    take_over: Callable[[Regularizer, dict[str, Any], Settings], None] | None = None  # from that state
    data_pass: bool = False  # its consolidation reads the previous task's data once (a Fisher, an importance)
    # (switch, strength): with the 0/1 setting `switch` at 1, the per-stage `strength` of a stage weighs
    # the task consolidated before it (the task weight w_t) and the regularizer's own strength is 1
    per_task_strength: tuple[str, str] | None = None
    # a 0/1 setting: at 1 its Fisher comes from the task's likelihood (the spec without its per-sample
    # loss: drawn labels, estimator mc) instead of the empirical Fisher of the task's loss
    likelihood_switch: str | None = None
    # 0/1 settings that leave a unit's key as it was while at 0 (added after units were named with
    # this part's other settings, so an earlier run's folder still finds its units)
    off_by_default: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        foreign = [k for k in (*self.settings, *self.stage_attributes) if not k.startswith(self.name + ".")]
        if foreign:
            raise ValueError(f"part {self.name!r}: settings must be named '{self.name}.<setting>', got {foreign}")
        unknown = [k for k in self.stage_attributes if k not in self.settings]
        if unknown:
            raise ValueError(f"part {self.name!r}: per-stage settings {unknown} are not among its settings")
        if self.per_task_strength is not None:
            switch, strength = self.per_task_strength
            if switch not in self.settings or strength not in self.stage_attributes:
                raise ValueError(f"part {self.name!r}: per_task_strength needs a setting and a per-stage setting")

    def per_task(self, settings: Settings) -> bool:
        """Whether the method's settings turn this part's per-task strength on (a 0/1 setting)."""
        return self.per_task_strength is not None and _flag(settings, self.per_task_strength[0])

    def likelihood(self, settings: Settings) -> bool:
        """Whether the method's settings ask this part's Fisher of the task's likelihood (a 0/1 setting)."""
        return self.likelihood_switch is not None and _flag(settings, self.likelihood_switch)


def _flag(settings: Settings, key: str) -> bool:
    flag = float(settings.get(key, 0.0))
    if flag not in (0.0, 1.0):
        raise ValueError(f"{key} is 0 or 1, got {flag}")
    return flag == 1.0


PARTS: dict[str, Part] = {}
COMMON_SETTINGS: dict[str, float] = {"lr": 2e-3}  # read by every method (naive fine-tuning's included)
DEFAULT_SETTINGS: dict[str, float] = dict(COMMON_SETTINGS)


def register_part(part: Part) -> Part:
    """Add ``part`` to the registry (its settings join :data:`DEFAULT_SETTINGS`)."""
    if part.name in PARTS:
        raise ValueError(f"a part named {part.name!r} is already registered")
    if "+" in part.name or "." in part.name:
        raise ValueError(f"a part's name may not hold '+' or '.', got {part.name!r}")
    PARTS[part.name] = part
    common = {k: DEFAULT_SETTINGS.pop(k) for k in COMMON_SETTINGS}
    DEFAULT_SETTINGS.update(part.settings)
    DEFAULT_SETTINGS.update(common)  # the common settings stay last
    return part


def check_stage_settings(overrides: Mapping[str, Any]) -> None:
    """A per-stage override must name a registered setting that may change between stages."""
    for key in overrides:
        part = PARTS.get(key.split(".")[0])
        if part is None or key not in part.settings:
            raise ValueError(f"unknown setting {key!r}; known: {', '.join(sorted(DEFAULT_SETTINGS))}")
        if key not in part.stage_attributes:
            settable = sorted(k for p in PARTS.values() for k in p.stage_attributes)
            raise ValueError(f"setting {key!r} cannot change between stages; these can: {', '.join(settable)}")
