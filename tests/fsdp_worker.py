"""The FSDP2 checks: run once per rank in a two-process gloo group with the model ``fully_shard``ed
(each Linear, then the root), and once in a single process on the unsharded model.

Every sharded result is gathered (``full_tensor()``) before it is saved, so the test compares it with
the single run's entry of the same key. Entries under ``bytes/`` are this rank's own (not gathered);
``errors`` holds the messages of the refusals (sharded runs only).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import clreg
from clreg import TaskSpec
from clreg._sharding import full, is_sharded, local
from clreg.distributed import full_state_dict
from clreg.functional import fisher_diagonal, mas_importance

try:
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # pragma: no cover - the test is skipped without torch.distributed
    distribute_tensor = None

N = 11  # odd: the ranks' shares of the samples differ in size
KINDS = ("ewc", "online_ewc", "mas", "si", "lwf", "kfac_ewc")


class Net(nn.Module):
    """Linear(4, 7), BatchNorm1d(7), tanh, Linear(7, 3): 7 and 3 rows shard unevenly over two ranks (4 + 3,
    2 + 1); the BatchNorm's parameters fall to the root's FSDP group and its running statistics stay
    replicated. It trains in eval mode (frozen statistics), so each rank's half-batch step is the full
    batch's."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(4, 7)
        self.norm = nn.BatchNorm1d(7)
        self.fc2 = nn.Linear(7, 3)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 1.5)
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


class Scaled(nn.Module):
    """A parameter no layer rule covers (an element-wise scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def shard(model: nn.Module, world: int, norm_kw: dict | None = None, **kw) -> nn.Module:
    """``fully_shard`` on each Linear (and on the BatchNorm with ``norm_kw``), then on the model (nothing
    in a single process)."""
    if world == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    m = mesh()
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=m, **kw)
        elif isinstance(layer, nn.BatchNorm1d) and norm_kw is not None:
            fully_shard(layer, mesh=m, **norm_kw)
    fully_shard(model, mesh=m, **kw)
    return model


def build(world: int, seed: int = 0, **kw) -> Net:
    return shard(Net(seed), world, **kw)


def data(seed: int = 0, n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: full(v).detach().clone() for k, v in tensors.items()}


def half(rank: int, world: int, n: int = 8) -> slice:
    return slice(rank * n // world, (rank + 1) * n // world)


def make(kind: str, model: nn.Module) -> clreg.Regularizer:
    return {
        "ewc": lambda: clreg.EWC(model, lam=3.0, estimator="exact"),
        "online_ewc": lambda: clreg.OnlineEWC(model, lam=2.0, gamma=0.5, estimator="mc", mc_samples=2),
        "mas": lambda: clreg.MAS(model, lam=4.0),
        "si": lambda: clreg.SI(model, c=0.5, xi=0.1),
        "lwf": lambda: clreg.LwF(model, temperature=2.0),
        "kfac_ewc": lambda: clreg.KFACEWC(model, lam=3.0, estimator="exact"),
    }[kind]()


def given_state(reg: clreg.EWC, seed: int = 11) -> None:
    """A state as a consolidation would leave it, without a Fisher: the same whole importance and anchor
    in every run (each rank keeps its shards), offset 0.25."""
    g = torch.Generator().manual_seed(seed)
    wholes = [(torch.rand(s, generator=g), torch.randn(s, generator=g)) for s in reg._pset.shapes]
    params = reg._pset.last()

    def cut(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None) if is_sharded(p) else t

    reg.importance.set([cut(a, p) for (a, _), p in zip(wholes, params)])
    reg.anchor.set([cut(m, p) for (_, m), p in zip(wholes, params)])
    reg.offset.fill_(0.25)
    reg._bump_tasks()
    reg._state_changed()


def first_task(model: nn.Module, reg: clreg.Regularizer, mode: str, rank: int, world: int) -> None:
    """Two SGD steps on task 1 (each rank its half of the batch; SI follows them), then consolidation on
    the whole task (clreg shards it)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    if isinstance(reg, clreg.SI):
        reg.attach(opt) if mode == "attached" else reg.track(opt)
    task = data(seed=6, n=8)
    x, y = (t[half(rank, world)] for t in task.tensors)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    reg.detach()
    reg.consolidate(model, task, TaskSpec())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)


def second_step(model: nn.Module, reg: clreg.Regularizer, mode: str, rank: int, world: int, **how) -> torch.Tensor:
    """One SGD step on task 2 with the regularizer (``accumulate`` micro-batches, clipping at ``clip``);
    returns the penalty's value (LwF's: the mean over ranks of each rank's half-batch value)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if mode == "attached":
        reg.attach(opt)
    x, y = (t[half(rank, world)] for t in data(seed=9, n=8).tensors)
    micro = how.get("accumulate", 1)  # "plain": 1
    opt.zero_grad()
    values = []
    for i, (xs, ys) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
        if world > 1 and micro > 1:
            model.set_requires_gradient_sync(i == micro - 1)  # FSDP's accumulation without communication
        out = model(xs)
        value = reg(model, inputs=xs, outputs=out)
        values.append(value.detach())
        extra = torch.zeros(()) if mode == "attached" else value
        ((F.cross_entropy(out, ys) + extra) / micro).backward()
    if "clip" in how:
        torch.nn.utils.clip_grad_norm_(model.parameters(), how["clip"])
    opt.step()
    reg.detach()
    value = values[-1].clone()
    if isinstance(reg, clreg.LwF) and world > 1:
        dist.all_reduce(value)
        value /= world
    return value


def state_record(prefix: str, reg: clreg.Regularizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state gathered, this rank's bytes of each buffer, and whether each sharded buffer is laid out
    as its parameter."""
    out: dict[str, torch.Tensor] = {}
    params = {n: p for n, p in model.named_parameters()}
    for name, buf in reg.named_buffers():
        out[f"{prefix}/state/{name}"] = full(buf).detach().clone()
        out[f"bytes/{prefix}/{name}"] = torch.tensor(local(buf).numel() * buf.element_size())
        out[f"sharded/{prefix}/{name}"] = torch.tensor(is_sharded(buf))
        param = params.get(name.split(".", 1)[-1].replace("/", "."))
        if is_sharded(buf) and param is not None:
            same = buf.device_mesh == param.device_mesh and buf.placements == param.placements
            out[f"laid_out/{prefix}/{name}"] = torch.tensor(same and local(buf).shape == local(param).shape)
    out[f"bytes/{prefix}/state_bytes"] = torch.tensor(reg.state_bytes())
    return out


def state_cases(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Each regularizer's state as built on the model."""
    out: dict[str, torch.Tensor] = {}
    for kind in KINDS:
        model = build(world, seed=5)
        out |= state_record(f"state/{kind}", make(kind, model), model)
    return out


def penalty_cases(rank: int, world: int) -> dict[str, torch.Tensor]:
    """EWC's penalty from a given state in both modes: a plain step, two micro-batches (FSDP's gradient
    sync off for the first), clip_grad_norm_ on the gradients."""
    out: dict[str, torch.Tensor] = {}
    for how in ({"plain": 1}, {"accumulate": 2}, {"clip": 0.05}):
        for mode in ("autograd", "attached"):
            key = f"how/{next(iter(how))}/{mode}"
            model = build(world, seed=5)
            reg = make("ewc", model)
            given_state(reg)
            out[f"{key}/value"] = second_step(model, reg, mode, rank, world, **how)
            out |= {f"{key}/param/{n}": p for n, p in gathered(dict(model.named_parameters())).items()}
    return out


def step_cases(rank: int, world: int, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each regularizer in each mode: the state after task 1, the value and the parameters after a step."""
    out: dict[str, torch.Tensor] = {}
    for kind in kinds:
        for mode in ("autograd", "attached"):
            if kind == "lwf" and mode == "attached":
                continue
            key = f"step/{kind}/{mode}"
            model = build(world, seed=5)
            reg = make(kind, model)
            first_task(model, reg, mode, rank, world)
            out |= state_record(key, reg, model)
            out[f"{key}/value"] = second_step(model, reg, mode, rank, world)
            out |= {f"{key}/param/{n}": p for n, p in gathered(dict(model.named_parameters())).items()}
    return out


def penalty_gradient(world: int, rank: int, mode: str, **kw) -> dict[str, torch.Tensor]:
    """The gradient the EWC penalty adds on a step (with minus without it, at lr 0), and its value."""
    grads = {}
    for with_reg in (True, False):
        model = build(world, seed=5, **kw)
        reg = make("ewc", model)
        given_state(reg)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        if mode == "attached" and with_reg:
            reg.attach(opt)
        seen: list[dict[str, torch.Tensor]] = []
        opt.register_step_pre_hook(
            lambda o, a, k, m=model, s=seen: s.append({n: p.grad for n, p in m.named_parameters()})
        )
        x, y = (t[half(rank, world)] for t in data(seed=9, n=8).tensors)
        out = model(x)
        loss = F.cross_entropy(out.float(), y)
        value = reg(model)
        if mode == "autograd" and with_reg:
            loss = loss + value
        loss.backward()
        opt.step()
        grads[with_reg] = gathered(seen[0])
        if with_reg:
            kept = {"value": value.detach().clone(), "offset": reg.offset.clone()}
            kept |= {f"param/{n}": p for n, p in gathered(dict(model.named_parameters())).items()}
            kept |= {
                f"importance/{n}": t for n, t in gathered(dict(zip(reg.param_names, reg.importance.tensors))).items()
            }
            kept |= {f"anchor/{n}": t for n, t in gathered(dict(zip(reg.param_names, reg.anchor.tensors))).items()}
    diff = {f"penalty_grad/{n}": grads[True][n] - grads[False][n] for n in grads[True]}
    return {**diff, **{f"data_grad/{n}": g for n, g in grads[False].items()}, **kept}


def mixed_precision(rank: int, world: int) -> dict[str, torch.Tensor]:
    """EWC under FSDP's MixedPrecisionPolicy (bf16 parameters and collectives where sharded)."""
    kw = {}
    if world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        kw = {
            "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
            # the BatchNorm in float32 (its statistics are float32), its input cast up by FSDP
            "norm_kw": {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32)},
        }
    out = {}
    for mode in ("autograd", "attached"):
        out |= {f"mp/{mode}/{k}": v for k, v in penalty_gradient(world, rank, mode, **kw).items()}
    return out


def rank_batches(world_for_reference: int = 2, n: int = N, size: int = 4) -> list[list[int]]:
    """The batches the ranks form of a Dataset under ``batched`` (strided shares, then batches of size)."""
    out = []
    for r in range(world_for_reference):
        idx = list(range(r, n, world_for_reference))
        out += [idx[i : i + size] for i in range(0, len(idx), size)]
    return out


def fisher_cases(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Each estimator and MAS on N samples (odd), gathered."""
    out: dict[str, torch.Tensor] = {}
    model, ds = build(world, seed=3), data()
    runs: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        "exact": lambda: fisher_diagonal(model, ds, estimator="exact", chunk_size=3),
        "mc": lambda: fisher_diagonal(model, ds, estimator="mc", mc_samples=2, chunk_size=3),
        "empirical": lambda: fisher_diagonal(model, ds, estimator="empirical", chunk_size=3),
        "max7": lambda: fisher_diagonal(model, ds, estimator="exact", max_samples=7),
        "mas": lambda: mas_importance(model, ds, chunk_size=3),
        "mas_normalized": lambda: mas_importance(model, ds, normalize=True, chunk_size=4),
    }
    # batched: the same batches in both runs (its value depends on how the data is split)
    if world > 1:
        runs["batched"] = lambda: fisher_diagonal(model, ds, estimator="batched", batch_size=4)
    else:
        batches = [tuple(t[idx] for t in ds.tensors) for idx in rank_batches()]
        runs["batched"] = lambda: fisher_diagonal(model, batches, estimator="batched")
    # an iterable of batches per rank, with as many batches on one rank as on the other plus one
    share = Subset(ds, list(range(rank, N, world))) if world > 1 else ds
    runs["loader"] = lambda: fisher_diagonal(model, DataLoader(share, batch_size=5), estimator="empirical")
    for name, run in runs.items():
        result = run()
        out[f"sharded/fisher/{name}"] = torch.tensor(all(is_sharded(v) for v in result.values()))
        out |= {f"fisher/{name}/{k}": v for k, v in gathered(result).items()}
    return out


def checkpoint_cases(rank: int, world: int, out_dir: str) -> dict[str, torch.Tensor]:
    """DCP (sharded) and the full form: saved here, loaded back into sharded regularizers; the test loads
    both into a single process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    out: dict[str, torch.Tensor] = {}
    model = build(world, seed=5)
    reg = clreg.Compose(make("ewc", model), make("si", model))
    first_task(model, reg["ewc"], "autograd", rank, world)
    reg["si"].update(model)  # a step of path for SI
    reg["si"].consolidate(model)
    out["ckpt/value"] = reg(model).detach().clone()
    out |= {f"ckpt/param/{n}": p for n, p in gathered(dict(model.named_parameters())).items()}
    dcp.save(
        {"model": get_model_state_dict(model), "reg": reg.state_dict()}, checkpoint_id=os.path.join(out_dir, "dcp")
    )
    whole = full_state_dict(reg)
    if rank == 0:
        torch.save(whole, os.path.join(out_dir, "full.pt"))
    dist.barrier()
    # back into fresh sharded regularizers on a fresh sharded model holding the same parameters
    for form in ("dcp", "full"):
        model2 = build(world, seed=7)
        reg2 = clreg.Compose(make("ewc", model2), make("si", model2))
        state = {"model": get_model_state_dict(model2), "reg": reg2.state_dict()}
        dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))  # the model's parameters
        model2.load_state_dict(state["model"])
        if form == "full":
            state["reg"] = torch.load(os.path.join(out_dir, "full.pt"), weights_only=True)
        reg2.load_state_dict(state["reg"])
        out[f"ckpt/{form}/value"] = reg2(model2).detach().clone()
        out[f"ckpt/{form}/sharded"] = torch.tensor(all(is_sharded(t) for t in reg2["ewc"].importance.tensors))
    return out


def refusals(world: int) -> list[str]:
    """The messages of what cannot work (sharded runs only)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    messages = []

    def refused(fn: Callable[[], object]) -> None:
        try:
            fn()
        except (ValueError, TypeError) as err:
            messages.append(f"{type(err).__name__}: {err}")
        else:
            messages.append("no error")

    m = mesh()
    partly = Net()  # only fc1 sharded: the other parameters stay plain
    fully_shard(partly.fc1, mesh=m)
    refused(lambda: clreg.EWC(partly))
    model = build(world)
    ewc = make("ewc", model)
    ewc.consolidate(model, data())
    by_columns = build(
        world, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % world == 0 else None
    )
    refused(lambda: ewc(by_columns))  # another layout of the same parameters
    refused(lambda: make("ewc", Net()).load_state_dict(ewc.state_dict()))  # sharded state, plain model
    refused(lambda: make("ewc", by_columns).load_state_dict(ewc.state_dict()))  # sharded another way
    plain = Net()
    early = make("ewc", plain)
    shard(plain, world)
    refused(lambda: early.consolidate(plain, data()))  # built before fully_shard
    refused(lambda: fisher_diagonal(shard(Scaled(), world), data(), estimator="exact"))
    empty_on_one = DataLoader(Subset(data(), [] if dist.get_rank() == 1 else [0, 2]), batch_size=2)
    refused(lambda: fisher_diagonal(model, empty_on_one, estimator="empirical"))  # no rank left waiting
    refused(lambda: mas_importance(model, empty_on_one))
    return messages


def replay_case(rank: int) -> dict[str, torch.Tensor]:
    buf = clreg.ReplayBuffer(3, seed=4)
    buf.add("a", [(torch.full((2,), float(10 * rank + i)), torch.tensor(rank)) for i in range(4)])
    return {"replay/a": torch.stack([s[0] for s in buf.samples("a")])}


def scenario(rank: int, world: int, out_dir: str | None = None) -> dict:
    """Every case (``results``) and, sharded, the refusals' messages (``errors``); the checkpoints are
    written to ``out_dir``."""
    out = state_cases(rank, world) | penalty_cases(rank, world) | mixed_precision(rank, world)
    out |= fisher_cases(rank, world) | step_cases(rank, world, ("ewc", "online_ewc", "mas", "kfac_ewc"))
    out |= step_cases(rank, world, ("si", "lwf"))
    messages: list[str] = []
    if world > 1:
        out |= replay_case(rank) | checkpoint_cases(rank, world, out_dir)
        messages = refusals(world)
    return {"results": out, "errors": messages}
