r"""The quadratic penalty shared by EWC, OnlineEWC, SI and MAS, with its closed-form gradient.

.. math::

    P(\theta) = s \sum_i A_i (\theta_i - m_i)^2 + s\,C, \qquad
    \nabla_{\theta_i} P = 2 s A_i (\theta_i - m_i),

where A is the importance, m the anchor, C ≥ 0 a constant (EWC's collapsed offset) and s the scale
(λ/2 for EWC, c for SI, λ for MAS). All functions work on lists of tensors with ``torch._foreach_*``
kernels: a handful of passes over memory and no autograd graph per parameter.

Parameters sharded by FSDP2 (DTensors, with their state sharded alike) are handled shard by shard: the
passes run on each rank's local shards and the value is the sum over ranks of the local sums (one
all-reduce of a scalar), the same on every rank. In the autograd mode the gradient reaching each
parameter is a DTensor sharded like it: the closed form on this rank's shard.

Example:
    >>> import torch
    >>> from clreg.functional import quadratic_penalty
    >>> theta = [torch.tensor([1.0, 2.0], requires_grad=True)]
    >>> value = quadratic_penalty(theta, [torch.tensor([1.0, 3.0])], [torch.zeros(2)], scale=0.5)
    >>> value.item(), torch.autograd.grad(value, theta)[0].tolist()
    (6.5, [1.0, 6.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._sharding import local_all, shard_mesh, sum_over_mesh, wrap_like

__all__ = [
    "add_quadratic_penalty_grad_",
    "importance_roots",
    "quadratic_penalty",
    "quadratic_penalty_grad",
    "quadratic_penalty_value",
]

GradRecorder = Callable[[Sequence[Tensor], Sequence[Tensor]], None]


def _as_state(params: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """``params`` detached, in the state's dtype (a no-op when they already match)."""
    return [p.detach() if p.dtype == s.dtype else p.detach().to(s.dtype) for p, s in zip(params, like)]


def _scaled_residual(params: Sequence[Tensor], anchor: Sequence[Tensor], root: Sequence[Tensor]) -> list[Tensor]:
    """u = √A ⊙ (θ − m): exactly zero at the anchor."""
    u = torch._foreach_sub(_as_state(params, anchor), anchor)
    torch._foreach_mul_(u, root)
    return u


def _sum_squares(u: Sequence[Tensor], sign: Sequence[Tensor] | None = None) -> Tensor:
    """Σ u², or Σ sign ⊙ u² with a signed importance."""
    if sign is None:
        return torch.stack(torch._foreach_norm(u)).square().sum()
    squares = torch._foreach_mul(u, u)
    torch._foreach_mul_(squares, sign)
    return torch.stack([q.sum() for q in squares]).sum()


def importance_roots(importance: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor] | None]:
    """(√|A|, sign(A)): the factors the penalty works with, the sign ``None`` when every A ≥ 0 (the
    usual case; SI without its clamp can give A < 0, where A = sign(A)·√|A|·√|A|).

    Example:
        >>> import torch
        >>> root, sign = importance_roots([torch.tensor([4.0, -9.0])])
        >>> root[0].tolist(), sign[0].tolist()
        ([2.0, 3.0], [1.0, -1.0])
    """
    if not any(bool((a < 0).any()) for a in importance):
        return torch._foreach_sqrt(importance), None
    return torch._foreach_sqrt(torch._foreach_abs(importance)), [torch.sign(a) for a in importance]


def quadratic_penalty_value(
    params: Sequence[Tensor],
    importance: Sequence[Tensor],
    anchor: Sequence[Tensor],
    scale: float,
    const: float | Tensor = 0.0,
    *,
    sqrt_importance: Sequence[Tensor] | None = None,
    importance_sign: Sequence[Tensor] | None = None,
) -> Tensor:
    """The penalty's value alone (no graph): s Σ A (θ − m)² + s C.

    ``sqrt_importance`` = √|A| and ``importance_sign`` = sign(A) (``None`` when A ≥ 0), when the caller
    keeps them across steps (:func:`importance_roots`).
    """
    mesh = shard_mesh(params)
    if mesh is not None:
        params, importance, anchor = local_all(params), local_all(importance), local_all(anchor)
        sqrt_importance = None if sqrt_importance is None else local_all(sqrt_importance)
        importance_sign = None if importance_sign is None else local_all(importance_sign)
    with torch.no_grad():
        root, sign = (sqrt_importance, importance_sign) if sqrt_importance is not None else importance_roots(importance)
        value = sum_over_mesh(_sum_squares(_scaled_residual(params, anchor, root), sign), mesh)
        return value.mul(scale).add(torch.as_tensor(const, dtype=value.dtype, device=value.device) * scale)


def quadratic_penalty_grad(
    params: Sequence[Tensor], importance: Sequence[Tensor], anchor: Sequence[Tensor], scale: float
) -> list[Tensor]:
    """The closed-form gradient 2 s A (θ − m), in the parameters' dtypes (sharded like them)."""
    if shard_mesh(params) is not None:
        shards = quadratic_penalty_grad(local_all(params), local_all(importance), local_all(anchor), scale)
        return [wrap_like(g, p) for g, p in zip(shards, params)]
    with torch.no_grad():
        d = torch._foreach_sub(_as_state(params, anchor), anchor)
        torch._foreach_mul_(d, importance)
        torch._foreach_mul_(d, 2.0 * scale)
        return [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(d, params)]


def add_quadratic_penalty_grad_(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    importance: Sequence[Tensor],
    weighted_anchor: Sequence[Tensor],
    scale: float,
) -> None:
    """``grads += 2 s (A θ − A m)`` in place, with ``weighted_anchor`` = A·m precomputed.

    Two fused passes and no temporaries when grads, params and state share a dtype.
    """
    if not grads:
        return
    if shard_mesh(params) is not None:  # in place on the local shards
        grads, params = local_all(grads), local_all(params)
        importance, weighted_anchor = local_all(importance), local_all(weighted_anchor)
    with torch.no_grad():
        if all(g.dtype == a.dtype and p.dtype == a.dtype for g, p, a in zip(grads, params, importance)):
            torch._foreach_addcmul_(grads, importance, params, value=2.0 * scale)
            torch._foreach_add_(grads, weighted_anchor, alpha=-2.0 * scale)
            return
        for g, p, a, am in zip(grads, params, importance, weighted_anchor):
            g.add_((a * p.to(a.dtype) - am).mul_(2.0 * scale).to(g.dtype))


class _QuadraticPenaltyFn(torch.autograd.Function):
    """Value forward, closed-form backward ``grad_output · 2 s A (θ − m) = grad_output · 2 s √A u``
    with u = √A (θ − m) (with a signed A: √|A| and the sign applied to the squares and the gradient).
    The first backward turns u into the gradient in place (no new tensor); a second one
    (``retain_graph``) recomputes u."""

    @staticmethod
    def forward(ctx, root, sign, anchor, scale, const, recorder, *params):
        u = _scaled_residual(params, anchor, root)
        ctx.u, ctx.root, ctx.sign, ctx.anchor, ctx.params = u, root, sign, anchor, params
        ctx.scale, ctx.recorder = scale, recorder
        return (_sum_squares(u, sign) + const) * scale

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.u if ctx.u is not None else _scaled_residual(ctx.params, ctx.anchor, ctx.root)
        ctx.u = None
        torch._foreach_mul_(grads, ctx.root)
        if ctx.sign is not None:
            torch._foreach_mul_(grads, ctx.sign)
        torch._foreach_mul_(grads, grad_output.to(grads[0].dtype) * (2.0 * ctx.scale))
        grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, ctx.params)]
        if ctx.recorder is not None:
            ctx.recorder(ctx.params, grads)
        return (None, None, None, None, None, None, *grads)


def quadratic_penalty(
    params: Sequence[Tensor],
    importance: Sequence[Tensor],
    anchor: Sequence[Tensor],
    scale: float,
    const: float | Tensor = 0.0,
    recorder: GradRecorder | None = None,
    *,
    sqrt_importance: Sequence[Tensor] | None = None,
    importance_sign: Sequence[Tensor] | None = None,
) -> Tensor:
    """The penalty as a differentiable scalar whose backward is the closed form.

    ``recorder(params, grads)``, if given, is called in backward with the gradients it returns
    (scaled by ``grad_output``, as autograd accumulates them). ``sqrt_importance`` = √|A| and
    ``importance_sign`` = sign(A) (``None`` when A ≥ 0), when the caller keeps them across steps
    (:func:`importance_roots`).
    """
    if not (len(params) == len(importance) == len(anchor)):
        raise ValueError("params, importance and anchor must have the same length")
    if sqrt_importance is None:
        sqrt_importance, importance_sign = importance_roots(local_all(importance))
    mesh = shard_mesh(params)
    if mesh is not None:
        return _sharded_penalty(params, anchor, scale, const, recorder, sqrt_importance, importance_sign, mesh)
    const_t = torch.as_tensor(const, dtype=anchor[0].dtype, device=anchor[0].device)
    return _QuadraticPenaltyFn.apply(sqrt_importance, importance_sign, anchor, float(scale), const_t, recorder, *params)


def _sharded_penalty(
    params: Sequence[Tensor],
    anchor: Sequence[Tensor],
    scale: float,
    const: float | Tensor,
    recorder: GradRecorder | None,
    root: Sequence[Tensor],
    sign: Sequence[Tensor] | None,
    mesh: object,
) -> Tensor:
    """:func:`quadratic_penalty` of sharded parameters: the closed form on the local shards (reached
    through ``to_local()``, whose backward makes each gradient a DTensor sharded like its parameter),
    the partial values summed over ranks, the constant added once. The recorder gets the local
    gradients, keyed by the sharded parameters."""
    shards = [p.to_local() for p in params]  # differentiable views
    anchor, root = local_all(anchor), local_all(root)
    sign = None if sign is None else local_all(sign)
    zero = torch.zeros((), dtype=anchor[0].dtype, device=anchor[0].device)
    rec = None if recorder is None else (lambda _shards, grads: recorder(params, grads))
    partial = _QuadraticPenaltyFn.apply(root, sign, anchor, float(scale), zero, rec, *shards)
    const_t = torch.as_tensor(const, dtype=partial.dtype, device=partial.device)
    return sum_over_mesh(partial, mesh) + const_t * float(scale)
