"""A plain classification loop with EWC: two tasks in sequence, forgetting with and without EWC.

python examples/ewc_classification.py          # about half a minute on a CPU
python examples/ewc_classification.py --smoke  # a few steps
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from toy_tasks import accuracy, make_task, mlp

import clreg


def run(lam: float, epochs: int, tasks: list, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ewc = clreg.EWC(model, lam=lam)
    for train, _ in tasks:
        for _ in range(epochs):
            for x, y in DataLoader(train, batch_size=32, shuffle=True):
                loss = F.cross_entropy(model(x), y) + ewc(model)
                opt.zero_grad()
                loss.backward()
                opt.step()
        ewc.consolidate(model, train)  # the task's Fisher (mc estimator) and anchor
    return [accuracy(model, test) for _, test in tasks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    parser.add_argument("--lam", type=float, default=1e5, help="a confident model has a small Fisher, hence a large λ")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tasks = [make_task(1, n=200 if args.smoke else 2000), make_task(2, n=200 if args.smoke else 2000)]
    epochs = 1 if args.smoke else 5
    naive = run(0.0, epochs, tasks)
    ewc = run(args.lam, epochs, tasks)
    print(f"naive fine-tuning: task 1 {naive[0]:.3f}  task 2 {naive[1]:.3f}")
    print(f"EWC (lam={args.lam:g}):  task 1 {ewc[0]:.3f}  task 2 {ewc[1]:.3f}")
    print(f"task 1 kept: naive {naive[0]:.3f} vs EWC {ewc[0]:.3f}")


if __name__ == "__main__":
    main()
