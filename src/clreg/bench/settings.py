"""Setting keys: the one place a method setting's name is read.

A setting is named ``[method:]part.name[@stage]``:

* ``part.name`` — a field of a registered part's settings (``ewc.lam``, ``lwf.alpha``,
  ``replay.capacity``), or a common setting with no part (``lr``);
* ``@stage`` — the value for that stage only (1-based: ``ewc.lam@3`` is stage 3's λ); a setting without
  it holds in every stage that does not set its own;
* ``method:`` — the setting applies to that method only (``ewc+lwf:lwf.alpha``), where a run holds
  several methods.

:meth:`SettingKey.parse` is the only parser of these names in :mod:`clreg.bench`; everything else
passes :class:`SettingKey` objects around.

Example:
    >>> from clreg.bench.settings import SettingKey
    >>> key = SettingKey.parse("ewc+lwf:ewc.lam@3")
    >>> key.method, key.part, key.name, key.stage, str(key)
    ('ewc+lwf', 'ewc', 'lam', 3, 'ewc+lwf:ewc.lam@3')
    >>> SettingKey.parse("lr").part, SettingKey.parse("lr").name
    ('', 'lr')
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["SettingKey", "parse_assignment", "parse_settings"]

_NAME = r"[a-z_][a-z0-9_]*"
_KEY = re.compile(
    rf"^(?:(?P<method>{_NAME}(?:\+{_NAME})*):)?(?:(?P<part>{_NAME})\.)?(?P<name>{_NAME})(?:@(?P<stage>\d+))?$"
)


@dataclass(frozen=True, order=True)
class SettingKey:
    """A parsed setting name (see the module): ``part`` is ``""`` for a common setting such as ``lr``."""

    part: str
    name: str
    stage: int | None = None
    method: str | None = None

    @classmethod
    def parse(cls, text: str | SettingKey) -> SettingKey:
        """``"[method:]part.name[@stage]"`` → a key (a ValueError naming the text when it is not one)."""
        if isinstance(text, SettingKey):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a setting name is a str, got {type(text).__name__}")
        match = _KEY.match(text.strip())
        if match is None:
            raise ValueError(f"setting {text!r} is not of the form '[method:]part.name[@stage]' (e.g. 'ewc.lam@3')")
        stage = match["stage"]
        if stage is not None and int(stage) < 1:
            raise ValueError(f"setting {text!r}: stages count from 1")
        return cls(match["part"] or "", match["name"], int(stage) if stage else None, match["method"])

    @property
    def base(self) -> SettingKey:
        """The key without its stage and method: the setting itself."""
        return replace(self, stage=None, method=None)

    def __str__(self) -> str:
        text = f"{self.part}.{self.name}" if self.part else self.name
        if self.stage is not None:
            text += f"@{self.stage}"
        return f"{self.method}:{text}" if self.method else text


def parse_settings(settings: Mapping[str | SettingKey, Any] | None) -> dict[SettingKey, Any]:
    """A mapping of setting names (or keys) to values, keyed by :class:`SettingKey`."""
    out: dict[SettingKey, Any] = {}
    for name, value in (settings or {}).items():
        key = SettingKey.parse(name)
        if key in out:
            raise ValueError(f"setting {key} is given twice")
        out[key] = value
    return out


def parse_assignment(text: str) -> tuple[SettingKey, str]:
    """``"ewc.lam@3=1e5"`` (a command-line override) → the key and the value's text."""
    name, eq, value = text.partition("=")
    if not eq or not value.strip():
        raise ValueError(f"a setting override is NAME=VALUE (e.g. 'ewc.lam=1e4'), got {text!r}")
    return SettingKey.parse(name), value.strip()
