"""L2-SP and RWalk in a two-process gloo group, under DDP and under FSDP2 (see l2sp_rwalk_dist_worker.py):
each rank's steps on its half of the batch give the single process's steps on the whole batch — values,
the gradients the optimizer used, the penalty's own gradient, RWalk's running Fisher, path score and
importance — with the state sharded like the parameters under FSDP2 and identical on every rank under DDP;
the full form of a sharded state loads into the unsharded model.

Neither needs a reduction of its own: L2-SP's state is a copy of the parameters, and RWalk's updates read
``.grad`` after DDP's all-reduce or FSDP's reduce-scatter, element by element.

Tolerances: float32; a sharded sum adds the ranks' partial sums in another order than the single process.
"""

from __future__ import annotations

import pytest
import torch

import _gloo

_gloo.require(fsdp2=True)

import clreg  # noqa: E402
import l2sp_rwalk_dist_worker as worker  # noqa: E402
from clreg.regularizers.l2sp import L2SP  # noqa: E402
from clreg.regularizers.rwalk import RWalk  # noqa: E402
from fsdp_worker import Net  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks = _gloo.run_ranks(worker.scenario, tmp_path_factory.mktemp("l2sp_rwalk_dist"))
    return ranks, worker.scenario(0, 1, wraps=("none",))["none"]


def entries(single: dict, prefix: str) -> list[str]:
    found = [k for k in single if k.startswith(prefix)]
    assert found, prefix
    return found


@pytest.mark.parametrize("wrap", worker.WRAPS)
@pytest.mark.parametrize(("variant", "mode"), worker.L2SP_CASES)
def test_l2sp_steps_on_ranks_equal_the_single_process(runs, wrap, variant, mode) -> None:
    ranks, single = runs
    prefix = f"l2sp/{variant}/{mode}/"
    keys = [k for k in entries(single, prefix) if not k.endswith("state_sharded")]
    assert len([k for k in keys if k.startswith(f"{prefix}grad/")]) == worker.STEPS * 6
    for r in ranks:
        for k in keys:
            torch.testing.assert_close(r[wrap][k], single[k], **TOL, msg=k)


@pytest.mark.parametrize("wrap", worker.WRAPS)
@pytest.mark.parametrize("variant", ["unit", "weighted"])
def test_l2sp_value_and_gradient_on_ranks_are_the_formula(runs, wrap, variant) -> None:
    """At the first step θ = θ⁰ + δ with δ_i = 0.05 (i + 1) for the i-th parameter: the value is
    (α/2) Σ ω δ² + (β/2) Σ_head θ², the penalty's gradient α ω δ on the body and β θ on the head."""
    ranks, _ = runs
    alpha, beta = 0.7, 0.3
    start = dict(Net(seed=5).named_parameters())
    omega = worker.omega() if variant == "weighted" else {n: torch.ones_like(start[n]) for n in worker.BODY}
    delta = {n: torch.full_like(p, 0.05 * (i + 1)) for i, (n, p) in enumerate(start.items())}
    theta = {n: (start[n] + delta[n]).detach() for n in start}
    want = {n: alpha * omega[n] * delta[n] for n in worker.BODY} | {n: beta * theta[n] for n in worker.HEAD}
    value = alpha / 2 * sum((omega[n] * delta[n] ** 2).sum() for n in worker.BODY)
    value = value + beta / 2 * sum((theta[n] ** 2).sum() for n in worker.HEAD)
    for r in ranks:
        got = r[wrap]
        torch.testing.assert_close(got[f"l2sp/{variant}/autograd/value/0"], value.detach(), **TOL)
        torch.testing.assert_close(got[f"l2sp/{variant}/attached/value/0"], value.detach(), **TOL)
        for n, g in want.items():
            torch.testing.assert_close(got[f"l2sp/{variant}/autograd/penalty_grad/{n}"], g, **TOL, msg=n)


@pytest.mark.parametrize("wrap", worker.WRAPS)
@pytest.mark.parametrize("mode", worker.RWALK_MODES)
def test_rwalk_state_on_ranks_equals_the_single_process(runs, wrap, mode) -> None:
    """Attached with the raw importance F + s̄; tracked with ``normalize=True``, whose minimum and maximum
    are taken over every rank's shards."""
    ranks, single = runs
    prefix = f"rwalk/{mode}/"
    for b in ("fisher", "score", "importance"):
        assert all(single[k].abs().max() > 1e-4 for k in entries(single, f"{prefix}state/{b}/")), b
    if mode == "track":  # normalised: F and s̄ each scaled to [0, 1] over every element
        importance = torch.cat([single[k].flatten() for k in entries(single, f"{prefix}state/importance/")])
        assert importance.min() >= 0 and 1 <= importance.max() <= 2
    keys = [k for k in entries(single, prefix) if not k.endswith("state_sharded")]
    for r in ranks:
        for k in keys:
            torch.testing.assert_close(r[wrap][k], single[k], **TOL, msg=k)


@pytest.mark.parametrize("wrap", worker.WRAPS)
def test_state_is_sharded_like_the_parameters_under_fsdp2_only(runs, wrap) -> None:
    ranks, single = runs
    for r in ranks:
        for k in [k for k in single if k.endswith("state_sharded")]:
            flags = r[wrap][k]
            assert flags.numel() > 0 and bool(flags.all() if wrap == "fsdp" else not flags.any()), k


def test_ddp_ranks_hold_identical_state(runs) -> None:
    """Under DDP nothing is reduced: every rank computes the same state from the same averaged gradient."""
    ranks, _ = runs
    assert set(ranks[0]["ddp"]) == set(ranks[1]["ddp"])
    for k, v in ranks[0]["ddp"].items():
        torch.testing.assert_close(ranks[1]["ddp"][k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("mode", worker.RWALK_MODES)
def test_the_full_form_of_the_sharded_state_loads_into_the_unsharded_model(runs, mode) -> None:
    ranks, _ = runs
    sharded = ranks[0]["fsdp"]
    model = Net(seed=5)
    reg = clreg.Compose(L2SP(model, alpha=0.3), RWalk(model, lam=2.0, alpha=0.5, eps=1e-2, update_every=2))
    reg.load_state_dict(ranks[0]["fsdp/full_state"][mode], strict=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(sharded[f"rwalk/{mode}/param/{n}"])
    torch.testing.assert_close(reg(model).detach(), sharded[f"rwalk/{mode}/value"], **TOL)
    for b in worker.BUFFERS:
        for n, t in zip(reg[1].param_names, getattr(reg[1], b).tensors):
            torch.testing.assert_close(t, sharded[f"rwalk/{mode}/state/{b}/{n}"], rtol=0, atol=0)
