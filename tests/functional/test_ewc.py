"""EWC's collapse of many tasks into one quadratic against the explicit sum."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from clreg.functional import ewc_merge_, quadratic_penalty, quadratic_penalty_value
from models import explicit_ewc, rand_like_shapes, shapes


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
