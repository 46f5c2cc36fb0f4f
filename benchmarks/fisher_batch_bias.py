"""How the ``batched`` Fisher (Avalanche's) depends on the batch size, against the per-sample one.

    python benchmarks/fisher_batch_bias.py

A small MLP trained briefly on a 4-class Gaussian-mixture task; 1024 samples. For each batch size B
it prints the total (sum over parameters) of the ``batched`` estimate, of the per-sample ``empirical``
Fisher F, and of the prediction F/B + (1 − 1/B)(E g)², each relative to F; with avalanche-lib
installed, also the importances of Avalanche's own ``EWCPlugin.compute_importances`` at batch size B.
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
    avalanche = avalanche_importances(model, x, y)
    print(f"{'B':>5s} {'batched / F':>12s} {'predicted':>10s}" + (f" {'Avalanche / F':>14s}" if avalanche else ""))
    for b in (1, 4, 16, 64, 256):
        bat = fisher_diagonal(model, data, estimator="batched", batch_size=b)
        got = sum(v.sum() for v in bat.values()) / total
        pred = (total / b + (1 - 1 / b) * mg2) / total
        row = f"{b:5d} {float(got):12.4f} {float(pred):10.4f}"
        if avalanche:
            row += f" {float(sum(v.sum() for v in avalanche(b).values()) / total):14.4f}"
        print(row)


def avalanche_importances(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``B -> {name: importance}`` from Avalanche's ``EWCPlugin`` (None without avalanche-lib)."""
    try:
        from avalanche.training.plugins import EWCPlugin
    except ImportError:
        return None
    data = TensorDataset(x, y, torch.zeros(len(y), dtype=torch.long))  # Avalanche's (x, y, task label)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def importances(b: int) -> dict[str, torch.Tensor]:
        imp = EWCPlugin(ewc_lambda=1.0).compute_importances(
            model, torch.nn.CrossEntropyLoss(), opt, data, torch.device("cpu"), b
        )
        return {k: v.data for k, v in imp.items()}

    return importances


if __name__ == "__main__":
    main()
