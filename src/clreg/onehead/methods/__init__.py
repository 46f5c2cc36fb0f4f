"""Continual-learning methods by name: ``naive``, ``ewc``, ``online_ewc``, ``si``, ``lwf``, ``mas``,
``replay``, and combinations joined by ``+`` (``ewc+lwf+replay``).

:mod:`~clreg.onehead.methods.registry` holds the parts (each with the settings it reads, what it
builds and which settings may change per stage), :mod:`~clreg.onehead.methods.parts` registers the
built-in ones, and :class:`~clreg.onehead.methods.method.Method` composes them. Adding a method is
one :func:`register_part` call.
"""

from . import parts as _parts  # noqa: F401  (registers the built-in parts)
from .method import Built, Method, check_settings, parse_methods, split_stage_key, stage_one_trackers
from .registry import COMMON_SETTINGS, DEFAULT_SETTINGS, PARTS, Part, check_stage_settings, register_part

ALLOWED_PARTS = frozenset(name for name, p in PARTS.items() if p.within_rules)  # the challenge's remedies

__all__ = [
    "ALLOWED_PARTS",
    "COMMON_SETTINGS",
    "DEFAULT_SETTINGS",
    "PARTS",
    "Built",
    "Method",
    "Part",
    "check_settings",
    "check_stage_settings",
    "parse_methods",
    "register_part",
    "split_stage_key",
    "stage_one_trackers",
]
