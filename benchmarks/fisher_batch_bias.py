"""How the ``batched`` Fisher (Avalanche's) depends on the batch size, against the per-sample one.

    python benchmarks/fisher_batch_bias.py

A small MLP trained briefly on a 4-class Gaussian-mixture task; 1024 samples. For each batch size B
it prints the total (sum over parameters) of the ``batched`` estimate, of the per-sample ``empirical``
Fisher F, and of the prediction F/B + (1 − 1/B)(E g)², each relative to F.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from clreg.functional import fisher_diagonal


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 1.5
    y = torch.randint(0, 4, (1024,), generator=g)
    x = centres[y] + torch.randn(1024, 16, generator=g)
    data = TensorDataset(x, y)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):  # partly trained: the mean gradient is not zero
        opt.zero_grad()
        F.cross_entropy(model(x[:256]), y[:256]).backward()
        opt.step()
    emp = fisher_diagonal(model, data, estimator="empirical")
    exact = fisher_diagonal(model, data, estimator="exact")
    mean_grad = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    total = sum(v.sum() for v in emp.values())
    mg2 = sum(gm.square().sum() for gm in mean_grad)
    print(
        f"per-sample empirical Fisher, total {total:.4g}; exact (model's own labels) {sum(v.sum() for v in exact.values()):.4g}"
    )
    print(f"{'B':>5s} {'batched / F':>12s} {'predicted':>10s}")
    for b in (1, 4, 16, 64, 256):
        bat = fisher_diagonal(model, data, estimator="batched", batch_size=b)
        got = sum(v.sum() for v in bat.values()) / total
        pred = (total / b + (1 - 1 / b) * mg2) / total
        print(f"{b:5d} {float(got):12.4f} {float(pred):10.4f}")


if __name__ == "__main__":
    main()
