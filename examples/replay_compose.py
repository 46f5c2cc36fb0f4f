"""EWC + LwF with a replay buffer: Compose sums the penalties, ReplayBuffer mixes past samples in.

python examples/replay_compose.py          # a few seconds on a CPU
python examples/replay_compose.py --smoke
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from toy_tasks import accuracy, make_task, mlp

import clreg


def run(use: bool, tasks: list, epochs: int) -> list[float]:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reg = clreg.Compose(clreg.EWC(model, lam=10.0), clreg.LwF(model, temperature=2.0, alpha=1.0))
    buffer = clreg.ReplayBuffer(capacity_per_task=20, seed=0)
    for t, (train, _) in enumerate(tasks):
        for _ in range(epochs):
            for x, y in DataLoader(train, batch_size=32, shuffle=True):
                out = model(x)
                loss = F.cross_entropy(out, y)
                if use:
                    loss = loss + reg(model, inputs=x, outputs=out)
                    if buffer.tasks:  # 8 replayed samples per step, split over the past tasks
                        for _task, (rx, ry) in buffer.sample(8).items():
                            loss = loss + F.cross_entropy(model(rx), ry)
                opt.zero_grad()
                loss.backward()
                opt.step()
        reg.consolidate(model, train, clreg.TaskSpec())
        buffer.add(t, train)
    if use:
        print("last values:", {k: round(v, 4) for k, v in reg.last_values.items()})
    return [accuracy(model, test) for _, test in tasks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    n = 200 if args.smoke else 2000
    tasks = [make_task(1, n), make_task(2, n), make_task(3, n)]
    epochs = 1 if args.smoke else 4
    naive, both = run(False, tasks, epochs), run(True, tasks, epochs)
    print("naive fine-tuning:      " + "  ".join(f"task {i + 1} {a:.3f}" for i, a in enumerate(naive)))
    print("EWC + LwF + replay:     " + "  ".join(f"task {i + 1} {a:.3f}" for i, a in enumerate(both)))


if __name__ == "__main__":
    main()
