"""Continual-learning methods as names: ``naive``, ``ewc``, ``online_ewc``, ``si``, ``lwf``, ``mas``,
``replay``, and combinations joined by ``+`` (``ewc+lwf+replay``).

A :class:`Method` turns its name and settings (``"ewc.lam"``, ``"lwf.alpha"``, …) into a
:class:`clreg.Compose` of regularizers and, for ``replay``, a :class:`clreg.ReplayBuffer`. Settings may
change per stage (the ``original`` profile's λ is 3.0 in stage 2 and 5.0 in stage 3).

Example:
    >>> from clreg.onehead.methods import Method
    >>> m = Method.parse("ewc+lwf+replay", {"ewc.lam": 10.0})
    >>> m.parts, m.within_rules, m.settings["ewc.lam"]
    (('ewc', 'lwf', 'replay'), True, 10.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .. import EWC, MAS, SI, Compose, LwF, OnlineEWC, ReplayBuffer

__all__ = ["ALLOWED_PARTS", "DEFAULT_SETTINGS", "PARTS", "Method", "parse_methods"]

PARTS = ("naive", "ewc", "online_ewc", "si", "lwf", "mas", "replay")
ALLOWED_PARTS = frozenset({"naive", "ewc", "lwf", "replay"})  # the challenge's remedies
DEFAULT_SETTINGS: dict[str, float] = {
    "ewc.lam": 1.0,
    "online_ewc.lam": 1.0,
    "online_ewc.gamma": 1.0,
    "si.c": 0.1,
    "si.xi": 1e-3,
    "lwf.alpha": 1.0,
    "lwf.temperature": 2.0,
    "mas.lam": 1.0,
    "replay.capacity": 10,  # stored images per past task (the challenge allows at most 10)
    "replay.per_step": 8,  # replayed images mixed into each step, split over the past tasks
    "replay.weight": 1.0,  # weight of each past task's replay loss
    "lr": 2e-3,  # every method's learning rate (naive fine-tuning's included)
}


def parse_methods(text: str) -> list[str]:
    """``"naive,ewc,ewc+lwf+replay"`` → the list of method names, each checked."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--methods needs at least one method, got {text!r}")
    for n in names:
        Method.parse(n)
    return names


@dataclass
class Method:
    name: str
    parts: tuple[str, ...]
    settings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, settings: dict[str, float] | None = None) -> Method:
        parts = tuple(p.strip() for p in name.split("+"))
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ValueError(f"unknown method part(s) {bad} in {name!r}; choose from {', '.join(PARTS)}, joined by '+'")
        if len(set(parts)) != len(parts):
            raise ValueError(f"method {name!r} repeats a part")
        if "naive" in parts and len(parts) > 1:
            raise ValueError(f"'naive' cannot be combined ({name!r})")
        merged = dict(DEFAULT_SETTINGS)
        for k, v in (settings or {}).items():
            if k not in DEFAULT_SETTINGS:
                raise ValueError(f"unknown setting {k!r}; known: {', '.join(sorted(DEFAULT_SETTINGS))}")
            merged[k] = float(v)
        return cls("+".join(parts), parts, merged)

    @property
    def within_rules(self) -> bool:
        """Whether every part is one of the challenge's allowed remedies (EWC, LwF, replay)."""
        return set(self.parts) <= ALLOWED_PARTS

    @property
    def uses_replay(self) -> bool:
        return "replay" in self.parts

    def relevant_settings(self) -> dict[str, float]:
        """The settings this method reads."""
        return {k: v for k, v in self.settings.items() if k == "lr" or k.split(".")[0] in self.parts}

    def regularizer(self, model: nn.Module, seed: int = 0) -> Compose | None:
        """The method's regularizers on ``model`` (``None`` for naive fine-tuning and pure replay)."""
        s = self.settings
        members = []
        for p in self.parts:
            if p == "ewc":
                members.append(EWC(model, lam=s["ewc.lam"], seed=seed))
            elif p == "online_ewc":
                members.append(OnlineEWC(model, lam=s["online_ewc.lam"], gamma=s["online_ewc.gamma"], seed=seed))
            elif p == "si":
                members.append(SI(model, c=s["si.c"], xi=s["si.xi"]))
            elif p == "lwf":
                members.append(LwF(model, temperature=s["lwf.temperature"], alpha=s["lwf.alpha"]))
            elif p == "mas":
                members.append(MAS(model, lam=s["mas.lam"], normalize=True))
        return Compose(*members) if members else None

    def replay_buffer(self, seed: int = 0) -> ReplayBuffer | None:
        if not self.uses_replay:
            return None
        return ReplayBuffer(int(self.settings["replay.capacity"]), policy="reservoir", seed=seed)

    def apply(self, reg: Compose | None, overrides: dict[str, Any]) -> None:
        """Set per-stage values (e.g. ``{"ewc.lam": 5.0}``) on the built regularizers."""
        if reg is None:
            return
        attr = {"ewc.lam": ("EWC", "lam"), "online_ewc.lam": ("OnlineEWC", "lam"), "si.c": ("SI", "c")}
        attr |= {"lwf.alpha": ("LwF", "alpha"), "mas.lam": ("MAS", "lam")}
        for key, value in overrides.items():
            if key not in attr:
                continue
            kind, name = attr[key]
            for m in reg.members:
                if type(m).__name__ == kind:
                    setattr(m, name, float(value))
