"""SI attached to the optimizer: the penalty's gradient before each step, the path after it.

python examples/si_attached.py          # a few seconds on a CPU
python examples/si_attached.py --smoke  # a few steps
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from toy_tasks import accuracy, make_task, mlp

import clreg


def run(c: float, tasks: list, epochs: int) -> list[float]:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    si = clreg.SI(model, c=c, xi=0.1).attach(opt)  # no change to the loss: clreg acts on opt.step()
    for train, _ in tasks:
        for _ in range(epochs):
            for x, y in DataLoader(train, batch_size=32, shuffle=True):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        si.consolidate(model)  # Ω from the path since the last consolidation
    return [accuracy(model, test) for _, test in tasks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--c", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    n = 200 if args.smoke else 2000
    tasks = [make_task(1, n), make_task(2, n)]
    epochs = 1 if args.smoke else 5
    naive, si = run(0.0, tasks, epochs), run(args.c, tasks, epochs)
    print(f"naive fine-tuning: task 1 {naive[0]:.3f}  task 2 {naive[1]:.3f}")
    print(f"SI (c={args.c:g}):      task 1 {si[0]:.3f}  task 2 {si[1]:.3f}")


if __name__ == "__main__":
    main()
