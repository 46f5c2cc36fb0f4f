"""A-GEM under DDP and FSDP2 in a spawned two-process gloo group (see agem_dist_worker.py): every rank
projects the same gradient, the one a single process gets with the union of the ranks' draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import _gloo

_gloo.require()

import agem_dist_worker as w  # noqa: E402
import clreg  # noqa: E402
from clreg.regularizers.agem import AGEM  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    runs = _gloo.run_ranks(w.scenario, tmp_path_factory.mktemp("agem_dist"))
    return {kind: [r[kind] for r in runs] for kind in ("rank", "sharded")}


def params_at(rank: dict, step: int) -> list[torch.Tensor]:
    n = len([k for k in rank if k.startswith(f"before/{step}/")])
    return [rank[f"before/{step}/{i}"].clone().requires_grad_() for i in range(n)]


def linear(params, x) -> torch.Tensor:
    weight, bias = params
    return x @ weight.T + bias


def projected_by_formula(grads, reference) -> list[torch.Tensor]:
    """g − (g·r / r·r) r when g·r < 0, over the concatenation of every tensor (the paper's eq. 11)."""
    g = torch.cat([t.reshape(-1) for t in grads])
    r = torch.cat([t.reshape(-1) for t in reference])
    dot = torch.dot(g, r)
    if dot < 0:
        g = g - dot / torch.dot(r, r) * r
    return [v.view_as(t) for v, t in zip(g.split([t.numel() for t in grads]), grads)]


def projected_union(runs: list[dict], forward) -> tuple[list[list[torch.Tensor]], int]:
    """Per step, the formula's projection of the whole batch's task gradient (DDP's and FSDP's mean over
    the halves) on the reference of the union of the ranks' draws, at the parameters rank 0 recorded;
    and the number of steps where the two conflict."""
    x, y = w.task_data()
    wants, conflicts = [], 0
    for s in range(w.STEPS):
        params = params_at(runs[0], s)
        task = torch.autograd.grad(F.cross_entropy(forward(params, x), y), params)
        union_x = torch.cat([r[f"drawn_x/{s}"] for r in runs])
        union_y = torch.cat([r[f"drawn_y/{s}"] for r in runs])
        ref = torch.autograd.grad(F.cross_entropy(forward(params, union_x), union_y), params)
        conflicts += int(
            torch.dot(torch.cat([t.reshape(-1) for t in task]), torch.cat([r.reshape(-1) for r in ref])) < 0
        )
        wants.append(projected_by_formula(task, ref))
    return wants, conflicts


def test_the_memory_is_global_and_the_draws_are_per_rank(ranks) -> None:
    ranks = ranks["rank"]
    torch.testing.assert_close(ranks[0]["memory"], ranks[1]["memory"], rtol=0, atol=0)
    assert ranks[0]["memory"].shape[0] == 8
    assert not torch.equal(ranks[0]["drawn_x/0"], ranks[1]["drawn_x/0"])


def test_its_own_memory_holds_the_single_process_choice(ranks) -> None:
    ranks = ranks["rank"]
    model = w.new_model()
    single = AGEM(model, w.loss_fn, capacity_per_task=5, seed=2)
    single.consolidate(model, TensorDataset(*w.memory_data()))  # each rank offered its share of the same choice
    want = sorted(map(tuple, torch.stack([s[0] for s in single.memory.samples(0)]).tolist()))
    for r in ranks:
        assert sorted(map(tuple, r["own_memory"].tolist())) == want


def test_every_rank_projects_the_same_gradient(ranks) -> None:
    ranks = ranks["rank"]
    for k in ranks[0]:
        if k.startswith("used/"):
            torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0, msg=k)


def test_the_projection_uses_the_union_of_the_draws(ranks) -> None:
    ranks = ranks["rank"]
    wants, conflicts = projected_union(ranks, linear)
    for s, want in enumerate(wants):
        for i, g in enumerate(want):
            torch.testing.assert_close(ranks[0][f"used/{s}/{i}"], g, rtol=1e-5, atol=1e-6)
    assert conflicts == int(ranks[0]["projections"]) > 0


def test_a_single_process_with_the_union_as_its_memory_agrees(ranks) -> None:
    ranks = ranks["rank"]
    model = w.new_model()
    union = [(r["drawn_x/0"][i], r["drawn_y/0"][i]) for r in ranks for i in range(w.SAMPLE_SIZE)]
    memory = clreg.ReplayBuffer(len(union))
    memory.add(0, union)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    AGEM(model, w.loss_fn, memory=memory, sample_size=len(union)).attach(opt)  # the whole memory, once
    used = []
    opt.register_step_pre_hook(lambda o, a, k: used.append([p.grad.clone() for p in model.parameters()]))
    x, y = w.task_data()
    w.loss_fn(model, x, y).backward()
    opt.step()
    for i, g in enumerate(used[0]):
        torch.testing.assert_close(ranks[0][f"used/0/{i}"], g, rtol=1e-5, atol=1e-6)


def mlp(params, x) -> torch.Tensor:
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def test_fsdp2_projects_the_union_reference_shard_by_shard(ranks) -> None:
    """Under fully_shard: the gradient used is the formula's, with the task gradient of the whole batch
    and the reference of the union of the ranks' draws, written here from the definitions."""
    sharded = ranks["sharded"]
    for s in range(w.STEPS):
        for r in sharded[1:]:
            for i, p in enumerate(params_at(sharded[0], s)):
                torch.testing.assert_close(r[f"before/{s}/{i}"], p.detach(), rtol=0, atol=0)
    wants, conflicts = projected_union(sharded, mlp)
    for s, want in enumerate(wants):
        for i, g in enumerate(want):
            for r in sharded:
                torch.testing.assert_close(r[f"used/{s}/{i}"], g, rtol=1e-5, atol=1e-6)
    assert conflicts == int(sharded[0]["projections"]) == int(sharded[1]["projections"]) > 0
