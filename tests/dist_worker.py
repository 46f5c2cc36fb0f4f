"""The distributed checks: run once per rank in a two-process gloo group, and once in a single process.

Each run returns a dict of tensors; the test compares ranks with each other and with the single run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset, TensorDataset

import clreg
from clreg import OutputSpec, TaskSpec
from clreg.functional import fisher_curvature, fisher_diagonal
from clreg.integrations.causal_lm import CausalLMDataset, causal_lm_spec
from models import MLP, Items, MultiHead, TinyLM, sequences

N = 11  # odd: the shards differ in size


def classification(seed: int = 0, n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def dense(seed: int = 0, n: int = 7) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n, 5, 5), generator=g)
    y[:, :, 0] = 255
    return TensorDataset(torch.randn(n, 3, 5, 5, generator=g), y)


def classification_images(seed: int = 0, n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def build(kind: str, model: torch.nn.Module) -> clreg.Regularizer:
    return {
        "ewc": lambda: clreg.EWC(model, lam=3.0),
        "online_ewc": lambda: clreg.OnlineEWC(model, lam=2.0, gamma=0.5, estimator="exact"),
        "si": lambda: clreg.SI(model, c=0.5, xi=0.1),
        "mas": lambda: clreg.MAS(model, lam=4.0),
        "lwf": lambda: clreg.LwF(model, temperature=2.0),
    }[kind]()


def scenario(rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    mlp = MLP()
    data = classification()
    for est in ("exact", "empirical", "mc"):
        for k, v in fisher_diagonal(mlp, data, estimator=est, chunk_size=3).items():
            out[f"fisher/{est}/{k}"] = v
    for k, v in fisher_diagonal(mlp, data, estimator="exact", max_samples=7).items():
        out[f"fisher/max7/{k}"] = v
    # the curvature engine: its diagonal and Kronecker factors, all-reduced over the ranks' shards
    for est in ("exact", "mc"):
        curv = fisher_curvature(MultiHead(), dense() if est == "mc" else classification_images(),
                                outputs=OutputSpec(select="seg" if est == "mc" else "cls"), estimator=est, chunk_size=2)  # fmt: skip
        out |= {f"curvature/{est}/diag/{k}": v for k, v in curv.diagonal.items()}
        out |= {f"curvature/{est}/A/{k}": a for k, (a, _) in curv.factors.items()}
        out |= {f"curvature/{est}/G/{k}": g for k, (_, g) in curv.factors.items()}
    # an iterable of batches: each rank reads its own shard (strided, no padding)
    shard = Subset(data, list(range(rank, N, world)))
    for est in ("exact", "empirical"):
        for k, v in fisher_diagonal(mlp, DataLoader(shard, batch_size=2), estimator=est).items():
            out[f"fisher_loader/{est}/{k}"] = v
    seg = MultiHead()
    spec = OutputSpec(select="seg", ignore_index=255)
    for k, v in fisher_diagonal(seg, dense(), outputs=spec, estimator="mc", mc_samples=2).items():
        out[f"fisher_dense/{k}"] = v
    # a causal LM's token logits: sequences sharded over the ranks, padding ignored
    lm, texts = TinyLM(), CausalLMDataset(Items(sequences(7)))
    for est in ("mc", "empirical"):
        for k, v in fisher_diagonal(lm, texts, spec=causal_lm_spec(), estimator=est, chunk_size=2).items():
            out[f"fisher_lm/{est}/{k}"] = v

    # SI under DDP: ω is identical on every rank without any reduction
    torch.manual_seed(1)
    model = MLP()
    ddp = DDP(model) if world > 1 else model
    si = clreg.SI(ddp, c=0.5, xi=0.1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    si.attach(opt)
    x, y = classification(seed=2 + rank, n=8).tensors  # each rank its own data
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    si.consolidate(ddp)
    out["si/omega_big"] = si.importance.tensors[0].clone()

    # the replay buffer is global
    buf = clreg.ReplayBuffer(3, seed=4)
    buf.add("a", [(torch.full((2,), float(10 * rank + i)), torch.tensor(rank)) for i in range(4)])
    out["replay/a"] = torch.stack([s[0] for s in buf.samples("a")])

    # a DDP training step with each regularizer in both modes gives the single-process gradient
    xb, yb = classification(seed=9, n=8).tensors
    lo, hi = rank * 8 // world, (rank + 1) * 8 // world
    for kind in ("ewc", "online_ewc", "si", "mas", "lwf"):
        for mode in ("autograd", "attached"):
            if kind == "lwf" and mode == "attached":
                continue
            torch.manual_seed(5)
            model = MLP()
            ddp = DDP(model) if world > 1 else model
            reg = build(kind, ddp)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            if kind == "si":
                reg.attach(opt)
            task = classification(seed=6)
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(ddp(task.tensors[0]), task.tensors[1]).backward()
                opt.step()
            reg.detach()
            reg.consolidate(ddp, task, TaskSpec())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
            if mode == "attached":
                reg.attach(opt)
            seen = []
            opt.register_step_pre_hook(
                lambda o, a, k, seen=seen, m=model: seen.append([p.grad.clone() for p in m.parameters()])
            )
            opt.zero_grad()
            xs, ys = xb[lo:hi], yb[lo:hi]
            o = ddp(xs)
            (F.cross_entropy(o, ys) + reg(ddp, inputs=xs, outputs=o)).backward()
            opt.step()
            for i, g in enumerate(seen[0]):
                out[f"step/{kind}/{mode}/{i}"] = g
    return out
