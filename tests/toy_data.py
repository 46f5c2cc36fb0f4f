"""A linearly separable toy classification data set for tests of training loops."""

from __future__ import annotations

import torch


class ToyData(torch.utils.data.Dataset):
    """``n`` points in 6 dimensions labelled by the argmax of ``x @ w`` (3 classes)."""

    def __init__(self, w: torch.Tensor, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x @ w).argmax(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]
