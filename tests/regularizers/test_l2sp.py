"""L2-SP against its definition, (α/2) Σ ω (θ − θ⁰)² + (β/2) Σ_head θ², written out here: the contract,
both modes over several steps against a hand loop (and the head's term against SGD's own weight
decay), the anchor's placement, the state, the ledger and bad inputs."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import clreg
from clreg.regularizers.l2sp import L2SP
from clreg.testing import check_regularizer
from models import MLP

ALPHA, BETA, LR, STEPS = 0.7, 0.3, 0.2, 4
HEAD = ["net.2.weight", "net.2.bias"]
BODY = ["net.0.weight", "net.0.bias"]


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))


def omega_for(model: torch.nn.Module, names: list[str], seed: int = 3) -> dict[str, torch.Tensor]:
    """A fixed positive importance (float32), one tensor per name."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(model.named_parameters())
    return {n: torch.rand(shapes[n].shape, generator=g) + 0.1 for n in names}


def zero_head(model: torch.nn.Module) -> torch.nn.Module:
    """A new head starting at 0, so the penalty is 0 where the contract expects it."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in HEAD:
                p.zero_()
    return model


def pull(model, weight, anchor, names) -> torch.Tensor:
    """Σ_{i ∈ names} weight_i (θ_i − anchor_i)², differentiable in the model's parameters."""
    params = dict(model.named_parameters())
    return sum((weight.get(n, 1.0) * (params[n] - anchor[n]) ** 2).sum() for n in names)


# -- the contract ---------------------------------------------------------------------------------


def start_of(tasks) -> dict[str, torch.Tensor]:
    return tasks[0].steps[0].before


def test_contract_unit_importance() -> None:
    def reference(model, reg, inputs, tasks):
        names = [n for n, _ in model.named_parameters()]
        return reg.alpha / 2 * pull(model, {}, start_of(tasks), names)

    check_regularizer(lambda m: L2SP(m, alpha=ALPHA), MLP(), data(), reference=reference)


def test_contract_given_importance() -> None:
    model = MLP()
    names = [n for n, _ in model.named_parameters()]
    omega = omega_for(model, names)

    def reference(model, reg, inputs, tasks):
        return reg.alpha / 2 * pull(model, {n: w.double() for n, w in omega.items()}, start_of(tasks), names)

    check_regularizer(lambda m: L2SP(m, alpha=ALPHA, importance=omega), model, data(), reference=reference)


def test_contract_with_the_head_term() -> None:
    def reference(model, reg, inputs, tasks):
        params = dict(model.named_parameters())
        decay = sum((params[n] ** 2).sum() for n in HEAD)
        return reg.alpha / 2 * pull(model, {}, start_of(tasks), BODY) + reg.beta / 2 * decay

    make = lambda m: L2SP(m, alpha=ALPHA, beta=BETA, head_params=HEAD)  # noqa: E731
    check_regularizer(make, zero_head(MLP()), data(), reference=reference)


def test_contract_anchor_at_consolidation() -> None:
    def reference(model, reg, inputs, tasks):
        last = {n: p.detach() for n, p in tasks[-1].model.named_parameters()}
        return reg.alpha / 2 * pull(model, {}, last, [n for n, _ in model.named_parameters()])

    check_regularizer(lambda m: L2SP(m, alpha=ALPHA, anchor_at="consolidation"), MLP(), data(), reference=reference)


# -- both modes over several steps ----------------------------------------------------------------


def hand_loop(model: torch.nn.Module, omega: dict | None, alpha: float, beta: float) -> dict[str, torch.Tensor]:
    """SGD on the cross-entropy plus the penalty's gradient written out: α ω (θ − θ⁰) on the body, β θ on
    the head (float64)."""
    theta = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    start = {n: t.clone() for n, t in theta.items()}
    x, y = data().tensors
    for _ in range(STEPS):
        leaves = {n: t.clone().requires_grad_() for n, t in theta.items()}
        out = torch.func.functional_call(model.double(), leaves, (x.double(),))
        grads = dict(zip(leaves, torch.autograd.grad(F.cross_entropy(out, y), list(leaves.values()))))
        for n in theta:
            extra = (
                beta * theta[n]
                if n in HEAD
                else alpha * (1.0 if omega is None else omega[n].double()) * (theta[n] - start[n])
            )
            theta[n] = theta[n] - LR * (grads[n] + extra)
    return theta


@pytest.mark.parametrize("mode", ["autograd", "attached", "pre_step"])
@pytest.mark.parametrize("weighted", [False, True])
def test_steps_equal_the_hand_loop(mode: str, weighted: bool) -> None:
    model = MLP()
    omega = omega_for(model, BODY) if weighted else None
    expected = hand_loop(copy.deepcopy(model), omega, ALPHA, BETA)
    reg = L2SP(model, alpha=ALPHA, beta=BETA, head_params=HEAD, importance=omega)
    assert reg.param_names == BODY and reg.head_names == HEAD
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if mode != "autograd":
        reg.attach(opt, hook=mode == "attached")
    x, y = data().tensors
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if mode == "autograd":
            loss = loss + reg(model)
        loss.backward()
        if mode == "pre_step":
            reg.pre_step()
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=1e-5, atol=1e-6, msg=n)


def test_head_term_is_sgd_weight_decay() -> None:
    """With α = 0 the attached L2-SP is SGD's own ``weight_decay=β`` on the head (torch's reference)."""
    ours = MLP()
    theirs = copy.deepcopy(ours)
    reg = L2SP(ours, alpha=0.0, beta=BETA, head_params=HEAD)
    opt = torch.optim.SGD(ours.parameters(), lr=LR)
    reg.attach(opt)
    named = dict(theirs.named_parameters())
    opt_ref = torch.optim.SGD(
        [{"params": [named[n] for n in BODY]}, {"params": [named[n] for n in HEAD], "weight_decay": BETA}], lr=LR
    )
    x, y = data().tensors
    for model, optimizer in ((ours, opt), (theirs, opt_ref)):
        for _ in range(STEPS):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_attached_value_is_detached_and_equal() -> None:
    model = MLP()
    reg = L2SP(model, alpha=ALPHA, beta=BETA, head_params=HEAD, importance=omega_for(model, BODY))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    value = reg(model)
    reg.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    attached = reg(model)
    assert value.requires_grad and not attached.requires_grad
    torch.testing.assert_close(attached, value.detach())


def test_second_backward_with_retained_graph() -> None:
    model = MLP()
    reg = L2SP(model, alpha=ALPHA)
    with torch.no_grad():
        model.net[0].weight.add_(0.5)
    value = reg(model)
    first = torch.autograd.grad(value, [model.net[0].weight], retain_graph=True)[0]
    second = torch.autograd.grad(value, [model.net[0].weight])[0]
    torch.testing.assert_close(first, torch.full_like(first, ALPHA * 0.5))
    torch.testing.assert_close(second, first)


def test_bf16_model_float32_state_and_value() -> None:
    model = MLP().to(torch.bfloat16)
    reg = L2SP(model, alpha=ALPHA, beta=BETA, head_params=HEAD)
    assert all(b.dtype == torch.float32 for b in reg.anchor.tensors)
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    value = reg(model)
    params = dict(model.named_parameters())
    expected = ALPHA / 2 * sum(((params[n].double() - start[n]) ** 2).sum() for n in BODY)
    expected = expected + BETA / 2 * sum((params[n].double() ** 2).sum() for n in HEAD)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-6, atol=1e-7)
    value.backward()
    assert model.net[0].weight.grad.dtype == torch.bfloat16


# -- the anchor -----------------------------------------------------------------------------------


def test_consolidate_keeps_the_start_unless_asked() -> None:
    model = MLP()
    start = [p.detach().clone() for p in model.parameters()]
    kept, moved = L2SP(model), L2SP(model, anchor_at="consolidation")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for reg in (kept, moved):
        reg.consolidate(model)
        assert int(reg.n_tasks) == 1
    for a, s in zip(kept.anchor.tensors, start):
        torch.testing.assert_close(a, s)
    assert float(moved(model).detach()) == 0.0
    kept.reset_anchor(model)
    assert float(kept(model).detach()) == 0.0


def test_unit_importance_keeps_the_anchor_alone() -> None:
    """The cheap path: no importance tensor and no cache, in either mode."""
    model = MLP()
    reg = L2SP(model, alpha=ALPHA)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data().tensors
    (F.cross_entropy(model(x), y) + reg(model)).backward()
    reg.attach(opt)
    opt.step()
    reg(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert not hasattr(reg, "importance")
    assert reg.state_bytes() == 4 * n_params + 8  # θ⁰ in float32 and the task count


# -- state ----------------------------------------------------------------------------------------


def saved(reg: L2SP) -> dict:
    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_round_trip_restores_every_part() -> None:
    model = MLP()
    omega = omega_for(model, BODY)
    reg = L2SP(model, alpha=ALPHA, beta=BETA, head_params=HEAD, importance=omega, anchor_at="consolidation")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    reg.consolidate(model)
    reg.alpha, reg.beta = 1.3, 0.05
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    fresh = L2SP(copy.deepcopy(model), head_params=HEAD, importance={n: torch.ones_like(w) for n, w in omega.items()})
    fresh.load_state_dict(saved(reg), strict=True)
    assert (fresh.alpha, fresh.beta, fresh.anchor_at, int(fresh.n_tasks)) == (1.3, 0.05, "consolidation", 1)
    for a, b in zip(fresh.importance.tensors, reg.importance.tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(fresh(model), reg(model), rtol=0, atol=0)


def test_state_of_another_build_is_refused() -> None:
    model = MLP()
    plain = saved(L2SP(model))
    with pytest.raises(ValueError, match="without an importance"):
        L2SP(model, importance=omega_for(model, [n for n, _ in model.named_parameters()])).load_state_dict(plain)
    with pytest.raises(ValueError, match="head_params"):
        L2SP(model, head_params=HEAD).load_state_dict(saved(L2SP(model, head_params=["net.2.bias"])))


# -- the ledger -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["autograd", "attached"])
def test_si_path_excludes_the_l2sp_gradient(mode: str) -> None:
    """SI on the same ledger integrates the task gradient alone: ω = −Σ g_task · Δθ, by hand."""
    model = MLP()
    reg = clreg.Compose(L2SP(model, alpha=ALPHA, beta=BETA, head_params=HEAD), clreg.SI(model))
    l2sp, si = reg[0], reg[1]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    si.track(opt)
    if mode == "attached":
        l2sp.attach(opt)
    x, y = data().tensors
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for _ in range(STEPS):
        opt.zero_grad()
        task = F.cross_entropy(model(x), y)
        g = dict(zip(expected, torch.autograd.grad(task, list(model.parameters()), retain_graph=True)))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        (task + (l2sp(model) if mode == "autograd" else 0)).backward()
        opt.step()
        for n, p in model.named_parameters():
            expected[n] -= g[n] * (p.detach() - before[n])
    for n, w in zip(si.param_names, si.omega.tensors):
        torch.testing.assert_close(w, expected[n], rtol=1e-5, atol=1e-7, msg=n)


# -- bad inputs -----------------------------------------------------------------------------------


def test_bad_importance() -> None:
    model = MLP()
    names = [n for n, _ in model.named_parameters()]
    good = omega_for(model, names)
    with pytest.raises(TypeError, match="mapping"):
        L2SP(model, importance=[torch.ones(1)])
    with pytest.raises(ValueError, match=r"missing \['net.2.bias'\]"):
        L2SP(model, importance={n: w for n, w in good.items() if n != "net.2.bias"})
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        L2SP(model, importance={**good, "extra": torch.ones(1)})
    with pytest.raises(ValueError, match=r"'net\.0\.weight' has shape"):
        L2SP(model, importance={**good, "net.0.weight": torch.ones(2, 2)})
    with pytest.raises(TypeError, match=r"'net\.0\.bias' must be a tensor"):
        L2SP(model, importance={**good, "net.0.bias": 1.0})
    with pytest.raises(ValueError, match=r"'net\.0\.bias' has negative"):
        L2SP(model, importance={**good, "net.0.bias": -good["net.0.bias"]})
    with pytest.raises(ValueError, match=r"'net\.2\.weight' contains NaN"):
        L2SP(model, importance={**good, "net.2.weight": torch.full_like(good["net.2.weight"], float("nan"))})
    wrapped = L2SP(model, importance={f"module.{n}": w for n, w in good.items()})  # wrapper prefixes are looked through
    assert wrapped.param_names == names


def test_bad_hyperparameters_and_selections() -> None:
    model = MLP()
    with pytest.raises(ValueError, match="alpha must be in"):
        L2SP(model, alpha=-1.0)
    with pytest.raises(TypeError, match="alpha must be a number"):
        L2SP(model, alpha="big")
    with pytest.raises(ValueError, match="beta must be in"):
        L2SP(model, beta=-0.1, head_params=HEAD)
    with pytest.raises(ValueError, match="needs head_params"):
        L2SP(model, beta=0.1)
    reg = L2SP(model)
    with pytest.raises(ValueError, match="needs head_params"):
        reg.beta = 0.1
    with pytest.raises(ValueError, match="anchor_at must be one of"):
        L2SP(model, anchor_at="end")
    with pytest.raises(ValueError, match="in both params and head_params"):
        L2SP(model, params=[*BODY, "net.2.bias"], head_params=HEAD)
    with pytest.raises(ValueError, match="unknown parameter name"):
        L2SP(model, head_params=["net.9.weight"])
    with pytest.raises(TypeError, match=r"nn\.Module"):
        L2SP("model")
    with pytest.raises(TypeError, match="Optimizer"):
        reg.attach("sgd")
    with pytest.raises(ValueError, match="holds none"):
        reg.attach(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
