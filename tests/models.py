"""Small models for the tests."""

from __future__ import annotations

import torch
from torch import nn


class MultiHead(nn.Module):
    """Conv-BN-ReLU trunk; a dict of outputs: dense 'seg' logits, 'cls' logits and a sigmoid 'det' map."""

    def __init__(self, c_in: int = 3, width: int = 6, n_seg: int = 4, n_cls: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.seg = nn.Conv2d(width, n_seg, 1)
        self.det = nn.Conv2d(width, 2, 1)
        self.box = nn.Conv2d(width, 4, 1)
        self.cls = nn.Linear(width, n_cls)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.trunk(x)
        return {
            "seg": self.seg(h),
            "det": {"heatmap": self.det(h), "box": self.box(h)},
            "cls": self.cls(h.mean(dim=(2, 3))),
        }


class PixelModel(nn.Module):
    """1×1 convolutions only: each pixel's output depends on that pixel's input alone."""

    def __init__(self, c_in: int = 2, hidden: int = 5, n_cls: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c_in, hidden, 1), nn.Tanh(), nn.Conv2d(hidden, n_cls, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLP(nn.Module):
    def __init__(self, d: int = 4, h: int = 6, c: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def per_sample_grads(model: nn.Module, loss_of_sample, n: int) -> list[dict[str, torch.Tensor]]:
    """Per-sample gradients by a plain autograd loop (the reference)."""
    out = []
    params = dict(model.named_parameters())
    for i in range(n):
        loss = loss_of_sample(i)
        g = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        out.append({k: (torch.zeros_like(p) if gi is None else gi) for (k, p), gi in zip(params.items(), g)})
    return out
