"""How far one ``mc`` Fisher lands from the ``exact`` one on a confident classifier, and what each costs.

    python benchmarks/fisher_mc_spread.py [--seeds 20]

Two classifiers with a ten-way output (an MLP 64 → 64 → 10): one trained on the first task of a split
of handwritten digits (the digits 0 and 1 only, as a task-incremental split's first task), one on all
ten digits. The data are scikit-learn's ``load_digits`` (1,797 real 8 × 8 digits) when scikit-learn is
installed, else a Gaussian mixture of the same shape (said in the output). For k = 1, 4 and 16 draws
per sample and ``--seeds`` seeds of the draws, it prints the ratio of the ``mc`` Fisher's total (sum
over parameters) to the ``exact`` one's — min, median, max, and the share of seeds within a factor 2 —
and the relative error of the whole diagonal; then the seconds per Fisher of each estimator, measured
in this run (compare the ratios, not the seconds, across machines).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from clreg.functional import fisher_diagonal

DRAWS = (1, 4, 16)


def digits() -> tuple[torch.Tensor, torch.Tensor, str]:
    """(x in [0, 1], labels, source)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(0)
        centres = torch.rand(10, 64, generator=g)
        y = torch.randint(0, 10, (1797,), generator=g)
        return (centres[y] + 0.3 * torch.randn(1797, 64, generator=g)).clamp(0, 1), y, "a Gaussian mixture"
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target), "scikit-learn's load_digits"


def trained(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def total(fisher: dict[str, torch.Tensor]) -> float:
    return float(sum(v.sum() for v in fisher.values()))


def flat(fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([fisher[k].flatten() for k in sorted(fisher)])


def spread(model: nn.Module, data: TensorDataset, seeds: int) -> None:
    exact = fisher_diagonal(model, data, estimator="exact")
    with torch.no_grad():
        p_true = torch.softmax(model(data.tensors[0]), 1).gather(1, data.tensors[1][:, None]).mean()
    print(f"  {len(data)} samples, mean true-class probability {float(p_true):.4f}, exact total {total(exact):.4g}")
    print(f"  {'draws':>5s} {'min':>8s} {'median':>8s} {'max':>8s} {'within 2x':>9s} {'diag rel. error (median)':>25s}")
    for k in DRAWS:
        ratios, errors = [], []
        for seed in range(seeds):
            mc = fisher_diagonal(model, data, estimator="mc", mc_samples=k, seed=seed)
            ratios.append(total(mc) / total(exact))
            errors.append(float((flat(mc) - flat(exact)).norm() / flat(exact).norm()))
        within = sum(0.5 <= r <= 2.0 for r in ratios) / len(ratios)
        print(
            f"  {k:5d} {min(ratios):8.3f} {statistics.median(ratios):8.3f} {max(ratios):8.3f} {within:9.0%} "
            f"{statistics.median(errors):25.3f}"
        )


def cost(model: nn.Module, data: TensorDataset, repeats: int = 3) -> None:
    runs = {"exact": {"estimator": "exact"}} | {f"mc, k = {k}": {"estimator": "mc", "mc_samples": k} for k in DRAWS}
    seconds = {}
    for name, kwargs in runs.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fisher_diagonal(model, data, **kwargs)
            best = min(best, time.perf_counter() - start)
        seconds[name] = best
    base = seconds["mc, k = 1"]
    print("  " + ", ".join(f"{name}: {s:.3f} s ({s / base:.1f}x)" for name, s in seconds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds of the mc draws per setting")
    args = parser.parse_args()
    x, y, source = digits()
    print(f"data: {source}")
    first = (y == 0) | (y == 1)
    for title, (xs, ys) in {
        "first task (digits 0 and 1, ten-way output)": (x[first], y[first]),
        "all ten digits": (x, y),
    }.items():
        model = trained(xs, ys)
        data = TensorDataset(xs, ys)
        print(f"{title}: mc total / exact total over {args.seeds} seeds")
        spread(model, data, args.seeds)
        print("  seconds per Fisher (best of 3, this run):")
        cost(model, data)


if __name__ == "__main__":
    main()
