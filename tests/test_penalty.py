"""The quadratic penalty, EWC's collapse and OnlineEWC against explicit formulas."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

import clreg
from clreg.functional import (
    add_quadratic_penalty_grad_,
    ewc_merge_,
    quadratic_penalty,
    quadratic_penalty_grad,
    quadratic_penalty_value,
)
from models import MLP

shapes = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3)), min_size=1, max_size=4)
dtypes = st.sampled_from([torch.float32, torch.float64])


def rand_like_shapes(shapes, dtype, seed, nonneg=False, zero_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
        if nonneg:
            t = t.abs()
            if zero_frac:
                t[torch.rand(s, generator=g) < zero_frac] = 0
        out.append(t)
    return out


@given(shapes=shapes, dtype=dtypes, seed=st.integers(0, 10_000), scale=st.floats(0.0, 10.0))
def test_penalty_value_and_gradient_equal_autograd(shapes, dtype, seed, scale) -> None:
    theta = [t.requires_grad_() for t in rand_like_shapes(shapes, dtype, seed)]
    imp = rand_like_shapes(shapes, dtype, seed + 1, nonneg=True, zero_frac=0.3)
    anc = rand_like_shapes(shapes, dtype, seed + 2)
    ref = scale * sum(((a * (t - m) ** 2).sum() for t, a, m in zip(theta, imp, anc)), torch.zeros((), dtype=dtype))
    ref_grads = torch.autograd.grad(ref, theta)
    value = quadratic_penalty(theta, imp, anc, scale)
    grads = torch.autograd.grad(value, theta)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(value.detach(), ref.detach(), **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)
    # the value alone, the closed-form gradient and the in-place attached form agree
    torch.testing.assert_close(quadratic_penalty_value(theta, imp, anc, scale), ref.detach(), **tol)
    for g, r in zip(quadratic_penalty_grad(theta, imp, anc, scale), ref_grads):
        torch.testing.assert_close(g, r, **tol)
    acc = [torch.ones_like(t) for t in theta]
    add_quadratic_penalty_grad_(acc, [t.detach() for t in theta], imp, [a * m for a, m in zip(imp, anc)], scale)
    for g, r in zip(acc, ref_grads):
        torch.testing.assert_close(g, r + 1, **tol)
    # properties: nonnegative, zero at the anchor, quadratic in the distance
    assert value.item() >= 0
    assert quadratic_penalty_value(anc, imp, anc, scale).item() == 0
    moved = [m + 3 * (t.detach() - m) for t, m in zip(theta, anc)]
    torch.testing.assert_close(quadratic_penalty_value(moved, imp, anc, scale), 9 * ref.detach(), **tol)


def test_penalty_gradient_against_finite_difference_and_grad_output() -> None:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    imp = torch.rand(5, dtype=torch.float64, generator=g)
    anc = torch.randn(5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda t: quadratic_penalty([t], [imp], [anc], 0.7, 0.3), (theta,))
    # backward is scaled by grad_output, as autograd requires (loss scaling, accumulation divisors)
    (3.5 * quadratic_penalty([theta], [imp], [anc], 0.7)).backward()
    torch.testing.assert_close(theta.grad, 3.5 * 2 * 0.7 * imp * (theta.detach() - anc))


def explicit_ewc(theta, tasks, lam):
    """(λ/2) Σ_t w_t Σ_i F_t,i (θ_i − θ*_t,i)²."""
    total = torch.zeros((), dtype=torch.float64)
    for w, fisher, anchor in tasks:
        for t, f, a in zip(theta, fisher, anchor):
            total = total + w * (f * (t - a) ** 2).sum()
    return lam / 2 * total


@given(
    shapes=shapes,
    n_tasks=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    lam=st.floats(0.0, 5.0),
    weights=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=5, max_size=5),
)
def test_ewc_collapse_equals_explicit_sum(shapes, n_tasks, seed, lam, weights) -> None:
    dtype = torch.float64
    tasks = []
    imp = [torch.zeros(s, dtype=dtype) for s in shapes]
    center = [torch.zeros(s, dtype=dtype) for s in shapes]
    offset = torch.zeros((), dtype=dtype)
    for t in range(n_tasks):
        fisher = rand_like_shapes(shapes, dtype, seed + 10 * t, nonneg=True, zero_frac=0.4)
        anchor = rand_like_shapes(shapes, dtype, seed + 10 * t + 1)
        w = weights[t]
        tasks.append((w, fisher, anchor))
        offset = ewc_merge_(imp, center, offset, [w * f for f in fisher], anchor)
    theta = [t.requires_grad_() for t in rand_like_shapes(shapes, dtype, seed + 999)]
    ref = explicit_ewc(theta, tasks, lam)
    got = quadratic_penalty(theta, imp, center, lam / 2, offset)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(torch.autograd.grad(got, theta), torch.autograd.grad(ref, theta)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # never below (λ/2) ΣC, and at the minimiser m it equals (λ/2) ΣC; one task: 0 at its anchor
    assert got.item() >= lam / 2 * offset.item() - 1e-9
    torch.testing.assert_close(quadratic_penalty_value(center, imp, center, lam / 2, offset), lam / 2 * offset)
    if n_tasks == 1:
        assert offset.item() == 0


def test_ewc_merge_is_stable_for_tiny_and_huge_importances() -> None:
    imp, center = [torch.tensor([0.0, 1e-30, 1e30])], [torch.zeros(3)]
    off = ewc_merge_(
        imp, center, torch.zeros((), dtype=torch.float64), [torch.tensor([0.0, 1e-30, 1e30])], [torch.ones(3)]
    )
    assert torch.isfinite(center[0]).all() and torch.isfinite(off)
    torch.testing.assert_close(center[0], torch.tensor([1.0, 0.5, 0.5]))


def classification(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def train_a_bit(model, data, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = data.tensors
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_ewc_module_equals_explicit_sum_with_changing_lambda_and_weights() -> None:
    torch.manual_seed(0)
    model = MLP()
    ewc = clreg.EWC(model, lam=2.0, estimator="exact")
    tasks = []
    for t, w in enumerate([1.0, 0.0, 3.0]):
        data = classification(t)
        train_a_bit(model, data)
        fisher = clreg.functional.fisher_diagonal(model, data, estimator="exact")
        tasks.append(
            (
                w,
                [fisher[n].double() for n in ewc.param_names],
                [p.detach().double().clone() for p in model.parameters()],
            )
        )
        ewc.consolidate(model, data, clreg.TaskSpec(weight=w))
    train_a_bit(model, classification(9))
    ewc.lam = 5.0
    theta = list(model.parameters())
    ref = explicit_ewc([p.double() for p in theta], tasks, 5.0)
    value = ewc(model)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-8)
    grads = torch.autograd.grad(value, theta)
    ref_grads = torch.autograd.grad(ref, theta)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-8)


def test_online_ewc_gamma_zero_is_ewc_on_last_task_and_gamma_decays() -> None:
    torch.manual_seed(1)
    model = MLP()
    online = clreg.OnlineEWC(model, lam=3.0, gamma=0.0, estimator="exact")
    decayed = clreg.OnlineEWC(model, lam=3.0, gamma=0.5, estimator="exact")
    fishers = []
    for t in range(2):
        data = classification(t)
        train_a_bit(model, data)
        online.consolidate(model, data)
        decayed.consolidate(model, data)
        fishers.append(clreg.functional.fisher_diagonal(model, data, estimator="exact"))
    last = clreg.EWC(model, lam=3.0, estimator="exact")
    last.consolidate(model, data)
    train_a_bit(model, classification(5))
    torch.testing.assert_close(online(model), last(model))
    for name, big in zip(decayed.param_names, decayed.importance.tensors):
        torch.testing.assert_close(big, 0.5 * fishers[0][name] + fishers[1][name])


def test_zero_before_consolidation_and_range_errors() -> None:
    model = MLP()
    for reg in (clreg.EWC(model), clreg.OnlineEWC(model), clreg.MAS(model), clreg.SI(model), clreg.LwF(model)):
        v = reg(model, inputs=torch.randn(2, 4))
        assert isinstance(v, torch.Tensor) and v.shape == () and v.item() == 0.0
    with pytest.raises(ValueError, match="lam must be in"):
        clreg.EWC(model, lam=-1.0)
    with pytest.raises(ValueError, match="gamma must be in"):
        clreg.OnlineEWC(model, gamma=1.5)
    with pytest.raises(ValueError, match="xi must be in"):
        clreg.SI(model, xi=0.0)
    with pytest.raises(ValueError, match="c must be in"):
        clreg.SI(model, c=-0.1)
    with pytest.raises(ValueError, match="temperature must be in"):
        clreg.LwF(model, temperature=0.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        clreg.LwF(model, alpha=-1)
    with pytest.raises(ValueError, match="clamp must be one of"):
        clreg.SI(model, clamp="always")
    with pytest.raises(ValueError, match="estimator must be one of"):
        clreg.EWC(model, estimator="fast")
    with pytest.raises(ValueError, match="weight must be >= 0"):
        clreg.TaskSpec(weight=-1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        clreg.OutputSpec(kind="logits")
    ewc = clreg.EWC(model, lam=1.0)
    with pytest.raises(ValueError, match="lam must be in"):
        ewc.lam = float("nan")
