"""LwF on a model with several outputs: a shared trunk with two heads returned as a dict.

Task A trains head "a"; task B trains head "b" on the same inputs labelled another way. While learning
B, LwF distils head "a" from the model as it was after A (selected with OutputSpec(select="a")), so
the shared trunk keeps serving A.

    python examples/lwf_multi_output.py          # a few seconds on a CPU
    python examples/lwf_multi_output.py --smoke
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from toy_tasks import make_two_labelings

import clreg


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU())
        self.a = torch.nn.Linear(8, 4)
        self.b = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h)}


def accuracy(model, data, head):
    x, y = data.tensors
    with torch.no_grad():
        return (model(x)[head].argmax(1) == y).float().mean().item()


def run(alpha: float, tasks: list, epochs: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lwf = clreg.LwF(model, temperature=2.0, alpha=alpha)
    for (train, _), head in zip(tasks, ("a", "b")):
        for _ in range(epochs):
            for x, y in DataLoader(train, batch_size=32, shuffle=True):
                out = model(x)
                loss = F.cross_entropy(out[head], y) + lwf(model, inputs=x, outputs=out)
                opt.zero_grad()
                loss.backward()
                opt.step()
        # the teacher becomes the current model; this task's output joins those distilled
        lwf.consolidate(model, None, clreg.TaskSpec(outputs=[clreg.OutputSpec(select=head)]))
    return accuracy(model, tasks[0][1], "a"), accuracy(model, tasks[1][1], "b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    n = 200 if args.smoke else 2000
    tasks = make_two_labelings(n)
    epochs = 1 if args.smoke else 5
    naive, lwf = run(0.0, tasks, epochs), run(args.alpha, tasks, epochs)
    print(f"naive fine-tuning: head a {naive[0]:.3f}  head b {naive[1]:.3f}")
    print(f"LwF (alpha={args.alpha:g}):  head a {lwf[0]:.3f}  head b {lwf[1]:.3f}")


if __name__ == "__main__":
    main()
