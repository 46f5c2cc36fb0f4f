"""The registry of scenarios by name: the built-in ones load on first use, a user's are added with
:func:`register_scenario`; :func:`make_scenario` builds one from its options (unknown ones refused).

Example:
    >>> from clreg.bench.registry import make_scenario, scenario_names
    >>> "digits" in scenario_names()
    True
    >>> make_scenario("digits", setting="domain").options["setting"]
    'domain'
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["SCENARIOS", "make_scenario", "register_scenario", "scenario_names"]

Factory = Callable[..., Any]


class _Builtin:
    """A built-in scenario's factory, imported on first use (``module:attribute``)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def resolve(self) -> Factory:
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def __call__(self, **options: Any) -> Any:
        return self.resolve()(**options)


SCENARIOS: dict[str, Factory] = {
    "digits": _Builtin("clreg.bench.scenarios.digits:DigitsScenario"),
    "onehead": _Builtin("clreg.bench.scenarios.onehead:OneHeadScenario"),
}
"""Scenario name → factory (its keyword arguments are the scenario's options)."""


def register_scenario(name: str) -> Callable[[Factory], Factory]:
    """Register a scenario's factory (its keyword arguments are the scenario's options) under ``name``
    (a decorator)."""

    def add(factory: Factory) -> Factory:
        if name in SCENARIOS:
            raise ValueError(f"a scenario named {name!r} is already registered")
        SCENARIOS[name] = factory
        return factory

    return add


def scenario_names() -> list[str]:
    """Every registered scenario's name, sorted."""
    return sorted(SCENARIOS)


def make_scenario(name: str, **options: Any) -> Any:
    """The scenario ``name`` built with ``options`` (a ValueError naming the known scenarios, or the
    option the factory refuses; an error inside the factory is its own)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; scenarios: {', '.join(scenario_names())}")
    factory = SCENARIOS[name]
    target = factory.resolve() if isinstance(factory, _Builtin) else factory
    try:
        inspect.signature(target).bind(**options)
    except TypeError as e:
        raise ValueError(f"scenario {name!r}: {e}") from None
    return target(**options)
