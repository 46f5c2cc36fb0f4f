"""Small models, data and references shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import clreg


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


def classification(seed: int = 0, n: int = 16) -> TensorDataset:
    """n samples of 4 features with labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def train_a_bit(model: nn.Module, data: TensorDataset, steps: int = 5) -> None:
    """Plain SGD on the cross-entropy, no regularizer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = data.tensors
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def train_task(model: nn.Module, reg: nn.Module, ds: TensorDataset, steps: int = 4, lr: float = 0.3) -> None:
    """SGD with the regularizer in the loss (SI tracking the optimizer), then the task's consolidation."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if isinstance(reg, clreg.SI):
        reg.track(opt)
    x, y = ds.tensors
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        (F.cross_entropy(out, y) + reg(model, inputs=x, outputs=out)).backward()
        opt.step()
    reg.detach()
    reg.consolidate(model, ds, clreg.TaskSpec())


def explicit_ewc(theta, tasks, lam):
    """(λ/2) Σ_t w_t Σ_i F_t,i (θ_i − θ*_t,i)², task by task, for ``tasks`` of (w, fisher, anchor)."""
    total = torch.zeros((), dtype=torch.float64)
    for w, fisher, anchor in tasks:
        for t, f, a in zip(theta, fisher, anchor):
            total = total + w * (f * (t - a) ** 2).sum()
    return lam / 2 * total


shapes = st.lists(  # lists of small 2-d shapes, for the hypothesis tests of the penalty
    st.tuples(st.integers(1, 4), st.integers(1, 3)), min_size=1, max_size=4
)


def rand_like_shapes(shapes, dtype, seed, nonneg=False, zero_frac=0.0):
    """Seeded random tensors of ``shapes`` (nonnegative, with a fraction of exact zeros, if asked)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
        if nonneg:
            t = t.abs()
            if zero_frac:
                t[torch.rand(s, generator=g) < zero_frac] = 0
        out.append(t)
    return out


V, L, D = 7, 6, 5  # TinyLM: vocabulary, sequence length, width


class TinyLM(torch.nn.Module):
    """Embedding, a causal running mean, a tanh layer and the vocabulary head; forward by keywords."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(V, D)
        self.mix = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        h = self.embed(input_ids)
        steps = torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype).reshape(1, -1, 1)
        h = torch.tanh(self.mix(h.cumsum(1) / steps))
        return {"logits": self.head(h)}


def sequences(n: int = 6, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids = torch.randint(0, V, (L,), generator=g)
        mask = torch.ones(L, dtype=torch.long)
        mask[L - 1 - i % 3 :] = 0  # 0 to 2 padded positions at the end
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return items


class Items(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]
