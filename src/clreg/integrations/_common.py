"""What the integrations share: the members of a regularizer by name, and how a data argument is told
from a data factory."""

from __future__ import annotations

from typing import Any

from ..regularizers import Compose, Regularizer


def members(reg: Regularizer | Compose) -> list[tuple[str, Regularizer]]:
    """The regularizers by name, nested Compose members flattened."""
    if not isinstance(reg, Compose):
        return [(type(reg).__name__.lower(), reg)]
    return [pair for name, m in zip(reg.names, reg.members)
            for pair in ([(name, m)] if not isinstance(m, Compose) else members(m))]  # fmt: skip


def is_data_factory(data: Any) -> bool:
    """A callable that makes the data (not a Dataset, a DataLoader or another iterable itself)."""
    return callable(data) and not hasattr(data, "__getitem__") and not hasattr(data, "__iter__")
