"""SI's path integral and importance against a hand computation on a quadratic loss."""

from __future__ import annotations

import itertools

import pytest
import torch

import clreg
from path_steps import follow, path_step

THETA0 = [0.5, -1.0, 2.0]
A = [1.0, 0.5, 2.0]
TASKS = [([1.5, 0.0, 1.0], False), ([0.0, 1.0, 3.0], True)]  # (target, maximize): ascent makes ω negative
LR, STEPS, C, XI = 0.1, 6, 0.7, 0.05


class Quad(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(THETA0))


def quad_loss(model: Quad, target: list[float]) -> torch.Tensor:
    return 0.5 * (torch.tensor(A) * (model.theta - torch.tensor(target)) ** 2).sum()


def hand_si(clamp: str | None) -> list[float]:
    """The reference, in plain Python floats."""
    theta, big = list(THETA0), [0.0, 0.0, 0.0]
    anchor = list(theta)
    for task, (target, maximize) in enumerate(TASKS):
        start, omega = list(theta), [0.0, 0.0, 0.0]
        for _ in range(STEPS):
            g = [a * (th - t) for a, th, t in zip(A, theta, target)]
            pen = [2 * C * o * (th - an) for o, th, an in zip(big, theta, anchor)] if task else [0.0] * 3
            sign = 1.0 if maximize else -1.0
            new = [th + sign * LR * (gi + pi) for th, gi, pi in zip(theta, g, pen)]
            omega = [w - gi * (n - th) for w, gi, n, th in zip(omega, g, new, theta)]
            theta = new
        for i in range(3):
            term = omega[i] / ((theta[i] - start[i]) ** 2 + XI)
            if clamp == "per_task":
                term = max(term, 0.0)
            big[i] += term
            if clamp == "cumulative":
                big[i] = max(big[i], 0.0)
        anchor = list(theta)
    return big


def run_si(mode: str, variant: str, clamp: str | None) -> torch.Tensor:
    model = Quad()
    si = clreg.SI(model, c=C, xi=XI, clamp=clamp)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if variant == "scaler" else None
    for target, maximize in TASKS:
        opt = torch.optim.SGD(model.parameters(), lr=LR, maximize=maximize)
        follow(si, opt, mode, scaler)
        if variant == "accumulate":  # two half-weighted micro-batches with the same mean gradient
            batches = [([t - 0.3 for t in target], 0.5), ([t + 0.3 for t in target], 0.5)]
        else:
            batches = [(target, 1.0)]
        for _ in range(STEPS):
            path_step(si, model, opt, mode, lambda tgt: quad_loss(model, tgt), batches, scaler=scaler)
        si.consolidate(model)
        si.detach()
    return si.importance.tensors[0]


@pytest.mark.parametrize(
    ("mode", "variant", "clamp"),
    list(
        itertools.product(
            ["attach", "track", "update"], ["plain", "accumulate", "scaler"], ["cumulative", "per_task", None]
        )
    ),
)
def test_si_importance_equals_hand_computation(mode: str, variant: str, clamp: str | None) -> None:
    got = run_si(mode, variant, clamp)
    torch.testing.assert_close(got, torch.tensor(hand_si(clamp)), rtol=2e-5, atol=1e-6)


def test_the_clamps_differ_on_this_path() -> None:
    values = {c: hand_si(c) for c in ("cumulative", "per_task", None)}
    assert values["cumulative"] != values["per_task"] != values[None]
    assert min(values[None]) < 0 <= min(values["cumulative"])


def test_total_path_gradient_includes_the_penalty() -> None:
    model = Quad()
    si = clreg.SI(model, c=C, xi=XI, path_gradient="total")
    for target, maximize in TASKS:
        opt = torch.optim.SGD(model.parameters(), lr=LR, maximize=maximize)
        si.attach(opt)
        for _ in range(STEPS):
            opt.zero_grad()
            quad_loss(model, target).backward()
            opt.step()
        si.consolidate(model)
        si.detach()
    assert not torch.allclose(si.importance.tensors[0], torch.tensor(hand_si("cumulative")))


@pytest.mark.parametrize("si_mode", ["track", "attach-first", "attach-last"])
def test_si_path_excludes_every_clreg_penalty(si_mode: str) -> None:
    """EWC attached and SI's own penalty beside SI: the path sees the task gradient alone,
    whichever hook runs first."""
    model = Quad()
    ewc = clreg.EWC(model, lam=4.0)
    ewc.importance.tensors[0].fill_(1.0)  # F = 1, anchor 0
    ewc._bump_tasks()
    si = clreg.SI(model, c=C, xi=XI)
    ewc.ledger = si.ledger  # built apart: they share a ledger only when told to
    si.importance.tensors[0].copy_(torch.tensor([0.5, 1.0, 2.0]))  # an active own penalty, anchor θ0
    si._bump_tasks()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if si_mode == "attach-first":
        si.attach(opt)
        ewc.attach(opt)
    elif si_mode == "attach-last":
        ewc.attach(opt)
        si.attach(opt)
    else:
        ewc.attach(opt)
        si.track(opt)
    theta = torch.tensor(THETA0, dtype=torch.float64)
    omega = torch.zeros(3, dtype=torch.float64)
    a, t = torch.tensor(A, dtype=torch.float64), torch.tensor(TASKS[0][0], dtype=torch.float64)
    big = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    anchor = torch.tensor(THETA0, dtype=torch.float64)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = quad_loss(model, TASKS[0][0])
        if si_mode == "track":
            loss = loss + si(model)
        loss.backward()
        opt.step()
        g = a * (theta - t)
        new = theta - LR * (g + 4.0 * theta + 2 * C * big * (theta - anchor))
        omega -= g * (new - theta)
        theta = new
    torch.testing.assert_close(model.theta.detach().double(), theta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(si.omega.tensors[0].double(), omega, rtol=1e-5, atol=1e-7)


def test_si_errors() -> None:
    model = Quad()
    si = clreg.SI(model)
    with pytest.raises(ValueError, match="no path to consolidate"):
        si.consolidate(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si.track(opt)
    with pytest.raises(ValueError, match="already tracking"):
        si.track(opt)
    with pytest.raises(TypeError, match="Optimizer"):
        clreg.SI(model).attach("sgd")
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="holds none"):
        clreg.SI(model).attach(other)


@pytest.mark.parametrize("mode", ["attached", "autograd"])
def test_a_step_the_gradscaler_skips_leaves_no_record_behind(mode: str) -> None:
    """EWC and SI on one ledger with a GradScaler: a step skipped for an inf gradient, then a taken
    one. SI's ω is −g_task ⊙ Δθ of the taken step alone, g_task the unscaled task gradient written here
    (the penalty's records of the skipped step are dropped, not subtracted at the next step)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ewc = clreg.EWC(model, lam=50.0, estimator="exact")
    ewc.consolidate(model, torch.utils.data.TensorDataset(x, y))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    si = clreg.SI(model, c=0.0)
    ewc.ledger = si.ledger
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    if mode == "attached":
        ewc.attach(opt)
        si.attach(opt, scaler)
    else:
        si.track(opt, scaler)
    for inject in (True, False):
        opt.zero_grad()
        before = [p.detach().clone() for p in model.parameters()]
        task = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        loss = torch.nn.functional.cross_entropy(model(x), y) + (ewc(model) if mode == "autograd" else 0.0)
        scaler.scale(loss).backward()
        if inject:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    assert int(si.steps) == 1
    for w, g, b, p in zip(si.omega.tensors, task, before, model.parameters()):
        torch.testing.assert_close(w, -g * (p.detach() - b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("attached", [False, True])
def test_negative_importance_without_the_clamp_gives_the_signed_penalty(attached: bool) -> None:
    """SI without its clamp may hold Ω < 0: the penalty is still c Σ Ω (θ − θ*)² (no NaN from √Ω)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    si = clreg.SI(model, c=0.7, clamp=None)
    state = si.state_dict()
    omega = {f"importance.{n}": torch.randn_like(p) for n, p in model.named_parameters()}
    anchor = {f"anchor.{n}": torch.randn_like(p) for n, p in model.named_parameters()}
    assert min(float(o.min()) for o in omega.values()) < 0
    state.update(omega)
    state.update(anchor)
    state["n_tasks"] = torch.ones_like(state["n_tasks"])
    si.load_state_dict(state)
    # the definition, written here
    params = dict(model.named_parameters())
    expected = sum(0.7 * (omega[f"importance.{n}"] * (p - anchor[f"anchor.{n}"]) ** 2).sum() for n, p in params.items())
    reference = torch.autograd.grad(expected, list(params.values()))
    if attached:
        si.attach(torch.optim.SGD(model.parameters(), lr=0.0))
        with torch.no_grad():
            torch.testing.assert_close(si(model), expected.detach())
        return
    value = si(model)
    torch.testing.assert_close(value, expected)
    grads = torch.autograd.grad(value, list(params.values()))
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r)
