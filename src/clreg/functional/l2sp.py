r"""L2-SP, the pull to the starting point (Li, Grandvalet & Davoine, ICML 2018, "Explicit inductive bias
for transfer learning with convolutional networks"), with its closed-form gradient.

.. math::

    P(\theta) = \frac{\alpha}{2} \sum_{i \in S} \omega_i (\theta_i - \theta^0_i)^2,
    \qquad \nabla_{\theta_i} P = \alpha\, \omega_i (\theta_i - \theta^0_i),

over the selected parameters S, with θ⁰ the starting (pretrained) parameters, α ≥ 0 and the importance
ω ≥ 0, 1 everywhere unless given (the paper's L2-SP has ω = 1). The ½ is the paper's, so the gradient
is α (θ − θ⁰), as a weight decay of α towards θ⁰. With no anchor (``anchor=None``) the same functions
give the paper's plain L2 on the parameters outside S (a new head), (β/2) Σ θ².

Unit importance keeps no importance tensor: the value and the gradient read θ and θ⁰ alone (one pass
for the value, two for the attached gradient). A given importance goes through
:mod:`clreg.functional.penalty` with scale α/2. Parameters sharded by FSDP2 (DTensors, with their
state sharded alike) are handled shard by shard, the value summed over ranks (one scalar all-reduce).

Example:
    >>> import torch
    >>> from clreg.functional.l2sp import l2sp_penalty
    >>> theta = [torch.tensor([3.0, 2.0], requires_grad=True)]
    >>> value = l2sp_penalty(theta, [torch.tensor([0.0, 2.0])], alpha=0.5)   # (0.5/2) · 3²
    >>> value.item(), torch.autograd.grad(value, theta)[0].tolist()
    (2.25, [1.5, 0.0])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._params import state_dtype
from .._sharding import local_all, shard_mesh, sum_over_mesh, wrap_like
from .penalty import (
    GradRecorder,
    _as_state,
    _sum_squares,
    add_quadratic_penalty_grad_,
    quadratic_penalty,
    quadratic_penalty_grad,
    quadratic_penalty_value,
)

__all__ = ["add_l2sp_penalty_grad_", "l2sp_penalty", "l2sp_penalty_grad", "l2sp_penalty_value"]


def _wide(t: Tensor) -> Tensor:
    """``t`` detached in the state dtype (the wider of float32 and its own): itself when it already is."""
    t = t.detach()
    wide = state_dtype(t.dtype)
    return t if t.dtype == wide else t.to(wide)


def _residual(params: Sequence[Tensor], anchor: Sequence[Tensor] | None) -> list[Tensor]:
    """θ − θ⁰ (a new tensor each) in the anchor's dtype; with no anchor, θ in the state dtype (which may be
    θ itself: never change it in place)."""
    if anchor is None:
        return [_wide(p) for p in params]
    return torch._foreach_sub(_as_state(params, anchor), anchor)


def _check(params: Sequence[Tensor], anchor: Sequence[Tensor] | None, importance: Sequence[Tensor] | None) -> None:
    if anchor is not None and len(anchor) != len(params):
        raise ValueError(f"params and anchor must have the same length, got {len(params)} and {len(anchor)}")
    if importance is not None:
        if anchor is None:
            raise ValueError("an importance needs an anchor (the plain L2 to 0 has unit importance)")
        if len(importance) != len(params):
            raise ValueError(
                f"params and importance must have the same length, got {len(params)} and {len(importance)}"
            )


class _PullFn(torch.autograd.Function):
    """Value forward s Σ u², u = θ − θ⁰ (or θ); closed-form backward ``grad_output · 2 s u``. With an
    anchor the first backward turns u into the gradient in place; a second one (``retain_graph``)
    recomputes it."""

    @staticmethod
    def forward(ctx, anchor, scale, recorder, *params):
        u = _residual(params, anchor)
        ctx.u = u if anchor is not None else None
        ctx.anchor, ctx.params, ctx.scale, ctx.recorder = anchor, params, scale, recorder
        return _sum_squares(u) * scale

    @staticmethod
    def backward(ctx, grad_output):
        factor = grad_output * (2.0 * ctx.scale)
        if ctx.u is not None:
            grads, ctx.u = ctx.u, None
            torch._foreach_mul_(grads, factor.to(grads[0].dtype))
        else:
            u = _residual(ctx.params, ctx.anchor)
            grads = torch._foreach_mul(u, factor.to(u[0].dtype))
        grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, ctx.params)]
        if ctx.recorder is not None:
            ctx.recorder(ctx.params, grads)
        return (None, None, None, *grads)


def l2sp_penalty(
    params: Sequence[Tensor],
    anchor: Sequence[Tensor] | None,
    alpha: float,
    importance: Sequence[Tensor] | None = None,
    *,
    recorder: GradRecorder | None = None,
    sqrt_importance: Sequence[Tensor] | None = None,
) -> Tensor:
    """(α/2) Σ ω (θ − θ⁰)² as a differentiable scalar whose backward is the closed form α ω (θ − θ⁰).

    ``anchor=None`` is the origin (the plain L2 of the head, with α in the role of β); ``importance=None``
    is ω = 1 (no tensor read). ``recorder(params, grads)``, if given, is called in backward with the
    gradients it returns (scaled by ``grad_output``). ``sqrt_importance`` = √ω, when the caller keeps it.
    """
    _check(params, anchor, importance)
    if importance is not None:
        return quadratic_penalty(
            params, importance, anchor, alpha / 2.0, 0.0, recorder, sqrt_importance=sqrt_importance
        )
    mesh = shard_mesh(params)
    if mesh is None:
        return _PullFn.apply(anchor, alpha / 2.0, recorder, *params)
    shards = [p.to_local() for p in params]  # differentiable views: each gradient a DTensor like its parameter
    rec = None if recorder is None else (lambda _shards, grads: recorder(params, grads))
    local_anchor = None if anchor is None else local_all(anchor)
    return sum_over_mesh(_PullFn.apply(local_anchor, alpha / 2.0, rec, *shards), mesh)


def l2sp_penalty_value(
    params: Sequence[Tensor],
    anchor: Sequence[Tensor] | None,
    alpha: float,
    importance: Sequence[Tensor] | None = None,
    *,
    sqrt_importance: Sequence[Tensor] | None = None,
) -> Tensor:
    """The value alone (no graph): (α/2) Σ ω (θ − θ⁰)²."""
    _check(params, anchor, importance)
    if importance is not None:
        return quadratic_penalty_value(params, importance, anchor, alpha / 2.0, sqrt_importance=sqrt_importance)
    mesh = shard_mesh(params)
    with torch.no_grad():
        local_anchor = None if anchor is None else local_all(anchor)
        partial = _sum_squares(_residual(local_all(params), local_anchor)) * (alpha / 2.0)
        return sum_over_mesh(partial, mesh)


def l2sp_penalty_grad(
    params: Sequence[Tensor],
    anchor: Sequence[Tensor] | None,
    alpha: float,
    importance: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """The closed-form gradient α ω (θ − θ⁰), in the parameters' dtypes (sharded like them)."""
    _check(params, anchor, importance)
    if importance is not None:
        return quadratic_penalty_grad(params, importance, anchor, alpha / 2.0)
    if shard_mesh(params) is not None:
        local_anchor = None if anchor is None else local_all(anchor)
        shards = l2sp_penalty_grad(local_all(params), local_anchor, alpha)
        return [wrap_like(g, p) for g, p in zip(shards, params)]
    with torch.no_grad():
        grads = torch._foreach_mul(_residual(params, anchor), alpha)
        return [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params)]


def add_l2sp_penalty_grad_(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    anchor: Sequence[Tensor] | None,
    alpha: float,
    importance: Sequence[Tensor] | None = None,
    *,
    weighted_anchor: Sequence[Tensor] | None = None,
) -> None:
    """``grads += α ω (θ − θ⁰)`` in place (on the local shards of sharded tensors).

    Unit importance, one dtype: two fused passes (``+= α θ``, ``-= α θ⁰``) and no temporary; other dtypes
    compute θ − θ⁰ in the state dtype, per tensor. A given importance needs ``weighted_anchor`` = ω·θ⁰
    (see :func:`~clreg.functional.add_quadratic_penalty_grad_`).
    """
    if not grads:
        return
    _check(params, anchor, importance)
    grads, params = local_all(grads), local_all(params)
    anchor = None if anchor is None else local_all(anchor)
    if importance is not None:
        if weighted_anchor is None:
            raise ValueError("a given importance needs weighted_anchor = importance * anchor")
        add_quadratic_penalty_grad_(grads, params, local_all(importance), local_all(weighted_anchor), alpha / 2.0)
        return
    with torch.no_grad():
        like = anchor if anchor is not None else params
        if all(g.dtype == p.dtype == a.dtype for g, p, a in zip(grads, params, like)):
            torch._foreach_add_(grads, params, alpha=alpha)
            if anchor is not None:
                torch._foreach_add_(grads, anchor, alpha=-alpha)
            return
        for g, u in zip(grads, _residual(params, anchor)):
            g.add_(u.mul_(alpha).to(g.dtype) if anchor is not None else (u * alpha).to(g.dtype))
