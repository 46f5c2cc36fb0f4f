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


def make_image_task(task: int, n: int = 1000, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Noisy 1×16×16 images with a 4×4 square in one quadrant; the class is where it is. Task 0: a bright
    square in quadrant ``class``; task 1: a dark square one quadrant on (``class + 1``), so a network that
    does not tell bright from dark squares apart loses task 0 when it learns task 1."""
    g = torch.Generator().manual_seed(seed + 100 * task)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    for i, quadrant in enumerate(((y + task) % 4).tolist()):
        r, c = divmod(quadrant, 2)
        dr, dc = torch.randint(0, 4, (2,), generator=g).tolist()
        x[i, 0, r * 8 + dr : r * 8 + dr + 4, c * 8 + dc : c * 8 + dc + 4] += 1.0 if task == 0 else -1.0
    split = n * 4 // 5
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


def cnn(classes: int = 4) -> torch.nn.Module:
    """Two conv-ReLU-pool blocks and a linear classifier, for 1×16×16 images."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, classes),
    )  # fmt: skip
