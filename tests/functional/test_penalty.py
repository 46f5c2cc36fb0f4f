"""The quadratic penalty and its closed-form gradient against autograd and finite differences."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from clreg.functional import (
    add_quadratic_penalty_grad_,
    quadratic_penalty,
    quadratic_penalty_grad,
    quadratic_penalty_value,
)
from models import rand_like_shapes, shapes

dtypes = st.sampled_from([torch.float32, torch.float64])


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
