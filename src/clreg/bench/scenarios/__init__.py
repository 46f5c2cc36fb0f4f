"""The built-in scenarios, registered on import: ``digits`` (Split Digits)."""

from . import digits  # noqa: F401
