"""Batching of the one-head benchmark's items: inputs stacked, a dict target stacked per key."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["collate"]


def collate(batch: list) -> tuple[Tensor, Any]:
    """Stack ``(input, target)`` items; a dict target is stacked per key.

    Example:
        >>> import torch
        >>> x, y = collate([(torch.zeros(2), {"a": torch.tensor(1)}), (torch.ones(2), {"a": torch.tensor(2)})])
        >>> x.shape, y["a"].tolist()
        (torch.Size([2, 2]), [1, 2])
    """
    xs = torch.stack([b[0] for b in batch])
    ys = [b[1] for b in batch]
    if isinstance(ys[0], dict):
        return xs, {k: torch.stack([y[k] for y in ys]) for k in ys[0]}
    return xs, torch.stack(ys)
