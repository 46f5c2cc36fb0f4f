"""RWalk against a step-by-step reference written here from the paper's definitions: a plain loop of SGD
steps on a tiny model that computes the running Fisher, the windows' scores, their clamp, the average
over tasks and the importance by hand; then the contract, a mid-task checkpoint, the ledger and bad
inputs."""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import clreg
from clreg.functional.rwalk import rwalk_importance_
from clreg.regularizers.l2sp import L2SP
from clreg.regularizers.rwalk import RWalk
from clreg.testing import check_regularizer
from models import MLP
from path_steps import follow, path_step

LAM, ALPHA, EPS, LR, STEPS = 0.8, 0.4, 1e-2, 0.3, 5
L2SP_ALPHA = 0.5


def tasks() -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Three tasks (inputs, labels, maximize): the last one ascends, so its windows' scores are negative."""
    g = torch.Generator().manual_seed(1)
    out = []
    for maximize in (False, False, True):
        out.append(
            (torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g), maximize)
        )
    return out


def tiny_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).double()


def task_grad(theta: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """∂ CE(x Wᵀ + b, y) / ∂θ at θ, by autograd on plain tensors."""
    w, b = (theta[n].clone().requires_grad_() for n in ("weight", "bias"))
    gw, gb = torch.autograd.grad(F.cross_entropy(x @ w.T + b, y), [w, b])
    return {"weight": gw, "bias": gb}


def min_max(terms: dict) -> dict:
    """Each tensor scaled by the minimum and maximum over every element of every tensor."""
    every = torch.cat([t.flatten() for t in terms.values()])
    lo, hi = every.min(), every.max()
    return {n: (t - lo) / (hi - lo) for n, t in terms.items()}


def hand_rwalk(k: int, with_l2sp: bool = False, normalize: bool = False) -> tuple[dict, dict, int]:
    """(importance F + s̄, running Fisher F, number of clamped window terms), step by step: SGD on the task
    loss plus λ Σ Ω (θ − θ*)² (plus L2-SP's α (θ − θ⁰) if asked, which the path must not see); with
    ``normalize`` Ω is the sum of F and s̄ each min-max scaled over all the parameters."""
    theta = {n: p.detach().clone() for n, p in tiny_model().named_parameters()}
    theta0 = {n: t.clone() for n, t in theta.items()}
    zeros = {n: torch.zeros_like(t) for n, t in theta.items()}
    fisher, importance, anchor, sbar, clamped = dict(zeros), dict(zeros), dict(theta), None, 0

    def window(omega, start, s):
        nonlocal clamped
        for n in theta:
            term = omega[n] / (0.5 * fisher[n] * (theta[n] - start[n]) ** 2 + EPS)
            clamped += int((term < 0).sum())
            s[n] = s[n] + term.clamp(min=0.0)

    for t, (x, y, maximize) in enumerate(tasks()):
        s, omega, start, n_in = dict(zeros), dict(zeros), dict(theta), 0
        for _ in range(STEPS):
            g = task_grad(theta, x, y)
            new = {}
            for n in theta:
                total = g[n] + (2 * LAM * importance[n] * (theta[n] - anchor[n]) if t else 0.0)
                if with_l2sp:
                    total = total + L2SP_ALPHA * (theta[n] - theta0[n])
                new[n] = theta[n] + (LR if maximize else -LR) * total
                omega[n] = omega[n] - g[n] * (new[n] - theta[n])
            theta, n_in = new, n_in + 1
            if n_in == k:
                fisher = {n: ALPHA * g[n] ** 2 + (1 - ALPHA) * fisher[n] for n in theta}
                window(omega, start, s)
                omega, start, n_in = dict(zeros), dict(theta), 0
        if n_in:
            window(omega, start, s)  # the open window, closed at consolidation without a Fisher update
        sbar = s if t == 0 else {n: (sbar[n] + s[n]) / 2 for n in theta}
        f_term, s_term = (min_max(fisher), min_max(sbar)) if normalize else (fisher, sbar)
        importance = {n: f_term[n] + s_term[n] for n in theta}
        anchor = dict(theta)
    return importance, fisher, clamped


def run_rwalk(
    mode: str, k: int, variant: str, path_gradient: str = "task", with_l2sp: bool = False, normalize: bool = False
) -> RWalk:
    model = tiny_model()
    rwalk = RWalk(
        model, lam=LAM, alpha=ALPHA, eps=EPS, update_every=k, path_gradient=path_gradient, normalize=normalize
    )
    also = [L2SP(model, alpha=L2SP_ALPHA)] if with_l2sp else []  # in the loss, on RWalk's ledger
    for l2sp in also:
        l2sp.ledger = rwalk.ledger
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if variant == "scaler" else None

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    for x, y, maximize in tasks():
        opt = torch.optim.SGD(model.parameters(), lr=LR, maximize=maximize)
        follow(rwalk, opt, mode, scaler)
        halves = [((x[:3], y[:3]), 0.5), ((x[3:], y[3:]), 0.5)] if variant == "accumulate" else [((x, y), 1.0)]
        for _ in range(STEPS):
            path_step(rwalk, model, opt, mode, loss_fn, halves, scaler=scaler, also=also)
        rwalk.detach()
        rwalk.consolidate(model)
    return rwalk


def by_name(reg: RWalk, store) -> dict[str, torch.Tensor]:
    return dict(zip(reg.param_names, store.tensors))


@pytest.mark.parametrize(
    ("mode", "k", "variant", "normalize"),
    [
        (*case, False)
        for case in itertools.product(["attach", "track", "update"], [1, 3], ["plain", "accumulate", "scaler"])
    ]
    + [("attach", 3, "plain", True), ("track", 1, "scaler", True), ("update", 3, "accumulate", True)],
)
def test_importance_and_fisher_equal_the_step_by_step_reference(
    mode: str, k: int, variant: str, normalize: bool
) -> None:
    rwalk = run_rwalk(mode, k, variant, normalize=normalize)
    importance, fisher, _ = hand_rwalk(k, normalize=normalize)
    for n in importance:
        torch.testing.assert_close(by_name(rwalk, rwalk.fisher)[n], fisher[n], rtol=1e-6, atol=1e-9, msg=n)
        torch.testing.assert_close(by_name(rwalk, rwalk.importance)[n], importance[n], rtol=1e-6, atol=1e-9, msg=n)
    assert int(rwalk.n_tasks) == 3 and int(rwalk.steps) == 0


def test_the_reference_exercises_the_clamp_and_the_average() -> None:
    """The reference is not trivial: windows were clamped, and the scores weigh in the importance."""
    importance, fisher, clamped = hand_rwalk(3)
    assert clamped > 0
    assert all((importance[n] - fisher[n]).abs().max() > 1e-3 for n in importance)
    scaled = torch.cat([t.flatten() for t in hand_rwalk(3, normalize=True)[0].values()])
    assert scaled.min() >= 0 and 1 <= scaled.max() <= 2, "each term in [0, 1], one of them at 1"
    assert max(t.max() for t in importance.values()) > 2, "the raw importance is not already in range"


@pytest.mark.parametrize("mode", ["attach", "track"])
def test_path_excludes_the_penalties_on_its_ledger(mode: str) -> None:
    """L2-SP on RWalk's ledger: the path and the Fisher see the task gradient alone; with
    ``path_gradient="total"`` they would not."""
    rwalk = run_rwalk(mode, 3, "plain", with_l2sp=True)
    importance, fisher, _ = hand_rwalk(3, with_l2sp=True)
    for n in importance:
        torch.testing.assert_close(by_name(rwalk, rwalk.importance)[n], importance[n], rtol=1e-6, atol=1e-9, msg=n)
    total = run_rwalk(mode, 3, "plain", path_gradient="total", with_l2sp=True)
    assert not torch.allclose(by_name(total, total.fisher)["weight"], fisher["weight"])


# -- the contract ---------------------------------------------------------------------------------


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))


def rwalk_reference(model, reg, inputs, tasks):
    """From the recorded steps (task-loss gradients, parameters before and after each step)."""
    names = list(tasks[0].steps[0].before)
    fisher = {n: 0.0 for n in names}
    sbar: dict = {}
    for t, task in enumerate(tasks):
        s = {n: 0.0 for n in names}
        omega, start, n_in = {n: 0.0 for n in names}, task.steps[0].before, 0
        for step in task.steps:
            omega = {n: omega[n] - step.grad[n] * (step.after[n] - step.before[n]) for n in names}
            n_in += 1
            if n_in == reg.update_every:
                fisher = {n: reg.alpha * step.grad[n] ** 2 + (1 - reg.alpha) * fisher[n] for n in names}
            if n_in == reg.update_every or step is task.steps[-1]:
                for n in names:
                    s[n] = s[n] + (omega[n] / (0.5 * fisher[n] * (step.after[n] - start[n]) ** 2 + reg.eps)).clamp(
                        min=0
                    )
                omega, start, n_in = {n: 0.0 for n in names}, step.after, 0
        sbar = s if t == 0 else {n: (sbar[n] + s[n]) / 2 for n in names}
    if reg.normalize:
        fisher, sbar = min_max(fisher), min_max(sbar)
    anchor = {n: p.detach() for n, p in tasks[-1].model.named_parameters()}
    params = dict(model.named_parameters())
    return reg.lam * sum(((fisher[n] + sbar[n]) * (params[n] - anchor[n]) ** 2).sum() for n in names)


@pytest.mark.parametrize("normalize", [False, True])
def test_contract(normalize: bool) -> None:
    make = lambda m: RWalk(m, lam=LAM, alpha=ALPHA, eps=EPS, update_every=2, normalize=normalize)  # noqa: E731
    check_regularizer(make, MLP(), data(), reference=rwalk_reference)


def test_normalize_counts_a_flat_term_as_zero() -> None:
    """A term with one value everywhere (here the Fisher) has no range: it adds 0, the other term its
    min-max scaling."""
    importance = [torch.empty(2), torch.empty(1)]
    fisher = [torch.full((2,), 3.0), torch.full((1,), 3.0)]
    score = [torch.tensor([1.0, 5.0]), torch.tensor([2.0])]
    rwalk_importance_(importance, fisher, score, normalize=True)
    assert [t.tolist() for t in importance] == [[0.0, 1.0], [0.25]]
    rwalk_importance_(importance, fisher, score)
    assert [t.tolist() for t in importance] == [[4.0, 8.0], [5.0]]


# -- a checkpoint in the middle of a task --------------------------------------------------------


def train(model, rwalk, x, y, steps: int, opt=None) -> torch.optim.Optimizer:
    opt = opt or torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(model(x), y) + rwalk(model)).backward()
        opt.step()
    return opt


def test_mid_task_checkpoint_resumes_exactly() -> None:
    """Saved with a window open (running F, score, ω and the window's start), loaded into a fresh RWalk on
    a fresh model, the rest of the task gives the uninterrupted run's state."""
    (x1, y1, _), (x2, y2, _), _ = tasks()
    model = tiny_model()
    rwalk = RWalk(model, lam=LAM, alpha=ALPHA, eps=EPS, update_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rwalk.track(opt)
    train(model, rwalk, x1, y1, STEPS, opt)
    rwalk.detach()
    rwalk.consolidate(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rwalk.track(opt)
    train(model, rwalk, x2, y2, 4, opt)  # one full window of 3, one step into the next
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "reg": rwalk.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert int(ckpt["reg"]["window_steps"]) == 1 and ckpt["reg"]["score.weight"].abs().sum() > 0

    twin = tiny_model()
    twin.load_state_dict(ckpt["model"])
    resumed = RWalk(twin, lam=1.0, update_every=7)
    resumed.load_state_dict(ckpt["reg"], strict=True)
    assert (resumed.lam, resumed.alpha, resumed.eps, resumed.update_every) == (LAM, ALPHA, EPS, 3)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=LR)
    resumed.track(twin_opt)
    train(model, rwalk, x2, y2, 3, opt)
    train(twin, resumed, x2, y2, 3, twin_opt)
    for reg in (rwalk, resumed):
        reg.detach()
        reg.consolidate(model if reg is rwalk else twin)
    for name in ("importance", "fisher", "score", "anchor"):
        for a, b in zip(getattr(resumed, name).tensors, getattr(rwalk, name).tensors):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# -- bad inputs -----------------------------------------------------------------------------------


def test_bad_hyperparameters() -> None:
    model = tiny_model()
    for kwargs, error, match in [
        ({"lam": -1.0}, ValueError, "lam must be in"),
        ({"alpha": 0.0}, ValueError, r"alpha must be in \(0.0, 1.0\]"),
        ({"alpha": 1.5}, ValueError, "alpha must be in"),
        ({"eps": 0.0}, ValueError, "eps must be in"),
        ({"update_every": 0}, ValueError, "update_every must be >= 1"),
        ({"update_every": 2.5}, TypeError, "update_every must be an int"),
        ({"update_every": True}, TypeError, "update_every must be an int"),
        ({"path_gradient": "both"}, ValueError, "path_gradient must be one of"),
        ({"lam": "strong"}, TypeError, "lam must be a number"),
        ({"normalize": 1}, TypeError, "normalize must be a bool"),
    ]:
        with pytest.raises(error, match=match):
            RWalk(model, **kwargs)
    reg = RWalk(model)
    with pytest.raises(ValueError, match="eps must be in"):
        reg.eps = -1e-3


def test_tracking_errors() -> None:
    model = tiny_model()
    reg = RWalk(model)
    with pytest.raises(ValueError, match="no path to consolidate"):
        reg.consolidate(model)
    with pytest.raises(TypeError, match="Optimizer"):
        reg.track("sgd")
    with pytest.raises(TypeError, match="Optimizer"):
        reg.attach(None)
    with pytest.raises(ValueError, match="holds none"):
        reg.track(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.track(opt)
    with pytest.raises(ValueError, match="already tracking"):
        reg.track(opt)
    reg.detach()
    with pytest.raises(ValueError, match="'weight' has shape"):
        reg.update(torch.nn.Linear(4, 2).double())


def test_nan_in_the_path_is_named() -> None:
    model = tiny_model()
    reg = RWalk(model, update_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.track(opt)
    opt.zero_grad()
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    model.bias.grad.fill_(float("nan"))
    opt.step()
    with pytest.raises(ValueError, match="'bias' contains NaN"):
        reg.consolidate(model)


def test_compose_finds_the_tracker() -> None:
    model = tiny_model()
    reg = clreg.Compose(L2SP(model), RWalk(model))
    assert reg.members_that("tracks_path") == [reg[1]]
    assert [type(r).__name__ for r in reg.members_that("attachable")] == ["L2SP", "RWalk"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    x, y, _ = tasks()[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert int(reg[1].steps) == 1
    copy.deepcopy(reg.state_dict())


def test_a_second_tracker_on_the_ledger_is_refused() -> None:
    """An SI and an RWalk in one Compose share a ledger: each penalty record would reach one of them only,
    so RWalk refuses to start tracking; with its own ledger, or ``path_gradient="total"``, it tracks."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = clreg.Compose(clreg.SI(model), RWalk(model))
    with pytest.raises(ValueError, match="RWalk and a SI on one GradientLedger"):
        reg.track(opt)
    reg.detach()
    with pytest.raises(ValueError, match="RWalk and a SI on one GradientLedger"):
        reg[1].update(model)
    reg[1].path_gradient = "total"
    reg[1].update(model)
    assert int(reg[1].steps) == 1
    si_on_weight, apart = clreg.SI(model, params=["weight"]), RWalk(model, params=["bias"])
    apart.ledger = si_on_weight.ledger  # disjoint parameters: no conflict
    assert si_on_weight.ledger.trackers == [si_on_weight, apart]
    apart.track(opt)
    alone = RWalk(model)
    alone.ledger = clreg.GradientLedger()
    alone.track(opt)


@pytest.mark.parametrize("mode", ["attach", "track"])
def test_bf16_model_keeps_float32_state(mode: str) -> None:
    """A bf16 model: every buffer in float32, the path and the Fisher from the bf16 gradients cast up (the
    window's score by hand from the float32 state), the value in float32, the added gradient in bf16."""
    model = MLP().to(torch.bfloat16)
    rwalk = RWalk(model, lam=LAM, alpha=1.0, eps=EPS, update_every=1)
    x, y = (t.to(torch.bfloat16) if t.is_floating_point() else t for t in data().tensors)
    for _ in range(2):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rwalk.attach(opt) if mode == "attach" else rwalk.track(opt)
        opt.zero_grad()
        before = [p.detach().float() for p in model.parameters()]
        loss = F.cross_entropy(model(x).float(), y)
        (loss if mode == "attach" else loss + rwalk(model)).backward()
        grads = [p.grad.float() for p in model.parameters()]  # the task gradient: no penalty before task 1
        opt.step()
        rwalk.detach()
        if int(rwalk.n_tasks) == 0:
            score = [
                (-g * (p.detach().float() - b) / (0.5 * g**2 * (p.detach().float() - b) ** 2 + EPS)).clamp(min=0)
                for g, p, b in zip(grads, model.parameters(), before)
            ]
        rwalk.consolidate(model)
        if int(rwalk.n_tasks) == 1:
            for got, f, s in zip(rwalk.importance.tensors, grads, score):
                torch.testing.assert_close(got, f**2 + s, rtol=1e-5, atol=1e-7)
    assert all(
        b.dtype == torch.float32 for n, b in rwalk.named_buffers() if b.is_floating_point() and "offset" not in n
    )
    with torch.no_grad():
        model.net[0].weight.add_(0.25)
    value = rwalk(model)
    assert value.dtype == torch.float32 and float(value.detach()) > 0
    value.backward()
    assert model.net[0].weight.grad.dtype == torch.bfloat16
