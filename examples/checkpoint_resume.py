"""Checkpoint and resume: model, optimizer and regularizer state in one file, restored exactly.

    python examples/checkpoint_resume.py [--smoke] [--path ckpt.pt]

Trains task 1, consolidates EWC and SI, saves everything, then builds fresh objects as a restarted
process would, loads the file (with weights_only=True) and checks that the penalties are unchanged.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from toy_tasks import make_task, mlp

import clreg


def build():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reg = clreg.Compose(clreg.EWC(model, lam=100.0), clreg.SI(model, c=1.0))
    reg["si"].attach(opt)
    return model, opt, reg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--path", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    train, _ = make_task(1, 200 if args.smoke else 2000)
    model, opt, reg = build()
    for x, y in DataLoader(train, batch_size=32, shuffle=True):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    reg.consolidate(model, train, clreg.TaskSpec())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # move away from the anchor so the penalties are not zero
    before = {k: float(v) for k, v in zip(reg.names, (r(model) for r in reg.members))}
    path = args.path or Path(tempfile.mkdtemp()) / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "reg": reg.state_dict()}, path)

    model2, opt2, reg2 = build()  # a restarted process
    ckpt = torch.load(path, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    reg2.load_state_dict(ckpt["reg"], strict=True)
    after = {k: float(v) for k, v in zip(reg2.names, (r(model2) for r in reg2.members))}
    print(f"saved to {path}")
    print("penalties before:", {k: round(v, 6) for k, v in before.items()})
    print("penalties after: ", {k: round(v, 6) for k, v in after.items()})
    print("restored exactly:", before == after)


if __name__ == "__main__":
    main()
