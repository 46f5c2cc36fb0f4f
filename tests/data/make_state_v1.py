"""Writes ``state_v1.pt``: state dicts of every regularizer and of a replay buffer in format version 1,
with the values, gradients and byte counts they give, for ``tests/regularizers/test_state.py``.

    PYTHONPATH=src:tests python tests/data/make_state_v1.py

The file pins the checkpoint format: a later clreg must load it with ``strict=True`` and give the same
numbers. Regenerate it only when the format version changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import clreg
from models import MLP

OUT = Path(__file__).with_name("state_v1.pt")


def builders(model: torch.nn.Module) -> dict[str, clreg.Regularizer | clreg.Compose]:
    """The regularizers the file holds, as a test builds them again before loading."""
    return {
        "ewc": clreg.EWC(model, lam=3.0, estimator="exact"),
        "online_ewc": clreg.OnlineEWC(model, lam=2.0, gamma=0.7, estimator="empirical"),
        "si": clreg.SI(model, c=0.5, xi=0.1),
        "mas": clreg.MAS(model, lam=4.0),
        "lwf": clreg.LwF(model, temperature=2.0, alpha=1.5),
        "compose": clreg.Compose(
            clreg.EWC(model, lam=1.0, estimator="mc", seed=3), clreg.SI(model, c=0.2), clreg.LwF(model)
        ),
    }


def task(seed: int, n: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def replay_buffer() -> clreg.ReplayBuffer:
    buf = clreg.ReplayBuffer(3, seed=5)
    g = torch.Generator().manual_seed(1)
    buf.add("det", [(torch.randn(3, generator=g), {"boxes": torch.rand(k, 4, generator=g)}) for k in (1, 3, 2, 4)])
    buf.add("cls", [(torch.full((2,), float(i)), torch.tensor(i)) for i in range(5)])
    return buf


def main() -> None:
    torch.manual_seed(0)
    model = MLP()
    regs = builders(model)
    for t in range(2):
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        for r in (regs["si"], regs["compose"]["si"]):
            r.track(opt)
        x, y = task(t).tensors
        for _ in range(4):
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y) + sum(r(model, inputs=x, outputs=out) for r in regs.values())
            loss.backward()
            opt.step()
        for r in regs.values():
            r.detach()
            r.consolidate(model, task(t), clreg.TaskSpec())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
    values, grads, nbytes = {}, {}, {}
    for name, r in regs.items():
        v = r(model, inputs=x, outputs=model(x))
        values[name] = v.detach()
        grads[name] = [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(torch.autograd.grad(v, list(model.parameters()), allow_unused=True), model.parameters())
        ]
        nbytes[name] = [m.state_bytes() for m in (r.members if isinstance(r, clreg.Compose) else [r])]
    buf = replay_buffer()
    torch.save(
        {
            "clreg_version": clreg.__version__,
            "model": model.state_dict(),
            "inputs": x,
            "states": {name: r.state_dict() for name, r in regs.items()},
            "values": values,
            "grads": grads,
            "state_bytes": nbytes,
            "replay": buf.state_dict(),
            "replay_bytes": buf.state_bytes(),
            "replay_next": buf.sample(4, generator=torch.Generator().manual_seed(2)),
        },
        OUT,
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
