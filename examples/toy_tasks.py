"""Two small classification tasks for the examples: Gaussian clusters whose centres differ per task
(the same labels, a shifted input distribution), so plain fine-tuning on the second forgets the first."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def make_task(seed: int, n: int = 2000, d: int = 20, classes: int = 4) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    split = n * 4 // 5
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


def mlp(d: int = 20, classes: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes))


def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def make_two_labelings(n: int = 2000, d: int = 20, seed: int = 0) -> list[tuple[TensorDataset, TensorDataset]]:
    """The same inputs (8 Gaussian clusters) labelled two ways: task A groups clusters in pairs
    {0,1}, {2,3}, …; task B in pairs {0,4}, {1,5}, …. One shared representation must serve both."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=g) * 1.5
    c = torch.randint(0, 8, (n,), generator=g)
    x = centres[c] + torch.randn(n, d, generator=g)
    split = n * 4 // 5
    out = []
    for y in (c // 2, c % 4):
        out.append((TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])))
    return out
