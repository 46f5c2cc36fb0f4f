r"""The Kronecker-factored quadratic penalty and its closed-form gradient (Martens & Grosse 2015;
Ritter, Botev & Barber 2018 for its use against forgetting).

For a layer with weight W (out × in; a convolution's flattened to out × C_in·k²) and bias b, the
augmented weight is :math:`\tilde W = [W, b]` and, with Kronecker factors A (in' × in') and G
(out × out) and :math:`\Delta = \tilde W - \tilde W^*`,

.. math::

    P = s \sum_{\text{layers}} \mathrm{vec}(\Delta)^\top (A \otimes G)\, \mathrm{vec}(\Delta)
      = s \sum_{\text{layers}} \mathrm{tr}(G\, \Delta\, A\, \Delta^\top), \qquad
    \nabla_{\tilde W} P = 2 s\, G\, \Delta\, A,

(A and G symmetric; vec stacks columns). EWC's convention is s = λ/2. No inverse is needed.

Under FSDP2 (weights sharded as DTensors by rows) G mixes the rows, so each layer's Δ is gathered
whole (one all-gather of Δ per layer and evaluation, one layer at a time); the value, computed from
the whole Δ, is the same on every rank, and each rank keeps its rows of the gradient. The factors are
replicated.

Example:
    >>> import torch
    >>> from clreg.functional import kfac_penalty
    >>> w = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    >>> value = kfac_penalty([(w, None)], [(torch.zeros(1, 2), None)], [torch.eye(2)], [torch.ones(1, 1)], 0.5)
    >>> value.item(), torch.autograd.grad(value, w)[0].tolist()
    (2.5, [[1.0, 2.0]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._sharding import full, is_sharded, local, shard_like, wrap_like
from .penalty import GradRecorder

__all__ = ["kfac_penalty", "kfac_penalty_grad", "kfac_penalty_value"]

Layer = tuple[Tensor, Tensor | None]  # (weight, bias or None)


def _augmented(weight: Tensor, bias: Tensor | None, like: Tensor) -> Tensor:
    """[W, b] as an (out, in') matrix in ``like``'s dtype."""
    w = weight.detach().reshape(weight.shape[0], -1).to(like.dtype)
    return w if bias is None else torch.cat([w, bias.detach().to(like.dtype)[:, None]], 1)


def _deltas(layers: Sequence[Layer], anchors: Sequence[Layer], factors: Sequence[Tensor]) -> list[Tensor]:
    return [_delta(lay, anc, a) for lay, anc, a in zip(layers, anchors, factors)]


def _delta(layer: Layer, anchor: Layer, like: Tensor) -> Tensor:
    """[W, b] − [W*, b*], whole: of sharded tensors, the shards' differences gathered."""
    if not is_sharded(layer[0]):
        return _augmented(*layer, like) - _augmented(*anchor, like)
    (w, b), (w0, b0) = layer, anchor
    whole = [
        full(wrap_like(local(t.detach()).to(like.dtype) - local(t0).to(like.dtype), t))
        for t, t0 in ((w, w0), (b, b0))
        if t is not None
    ]
    d = whole[0].reshape(w.shape[0], -1)
    return d if b is None else torch.cat([d, whole[1][:, None]], 1)


def _cut(grad: Tensor, param: Tensor) -> Tensor:
    """A whole gradient in the parameter's dtype, sharded like it where it is sharded."""
    grad = grad.to(param.dtype)
    return shard_like(grad, param) if is_sharded(param) else grad


def kfac_penalty_value(
    layers: Sequence[Layer], anchors: Sequence[Layer], a: Sequence[Tensor], g: Sequence[Tensor], scale: float
) -> Tensor:
    """s Σ tr(G Δ A Δᵀ), without a graph."""
    with torch.no_grad():
        total = torch.zeros((), dtype=a[0].dtype, device=a[0].device)
        for d, ai, gi in zip(_deltas(layers, anchors, a), a, g):
            total += ((gi @ d @ ai) * d).sum()
        return total * scale


def kfac_penalty_grad(
    layers: Sequence[Layer], anchors: Sequence[Layer], a: Sequence[Tensor], g: Sequence[Tensor], scale: float
) -> list[tuple[Tensor, Tensor | None]]:
    """Each layer's (weight, bias) gradient 2 s G Δ A, in the parameters' shapes and dtypes."""
    out = []
    with torch.no_grad():
        for (w, b), d, ai, gi in zip(layers, _deltas(layers, anchors, a), a, g):
            whole = (gi @ d @ ai).mul_(2.0 * scale)
            gw = _cut(whole[:, : w.shape[1:].numel()].reshape(w.shape), w)
            gb = None if b is None else _cut(whole[:, -1], b)
            out.append((gw, gb))
    return out


class _KFACPenaltyFn(torch.autograd.Function):
    """Value forward, closed-form backward ``grad_output · 2 s G Δ A``."""

    @staticmethod
    def forward(ctx, scale, layers, anchors, a, g, recorder, *params):
        ctx.grads, ctx.params, ctx.recorder = kfac_penalty_grad(layers, anchors, a, g, scale), params, recorder
        return kfac_penalty_value(layers, anchors, a, g, scale)

    @staticmethod
    def backward(ctx, grad_output):
        flat = [local(t) * grad_output.to(t.dtype) for gw, gb in ctx.grads for t in (gw, gb) if t is not None]
        if ctx.recorder is not None:
            ctx.recorder(ctx.params, flat)
        return (None, None, None, None, None, None, *flat)


def kfac_penalty(
    layers: Sequence[Layer],
    anchors: Sequence[Layer],
    a: Sequence[Tensor],
    g: Sequence[Tensor],
    scale: float,
    recorder: GradRecorder | None = None,
) -> Tensor:
    """The penalty as a differentiable scalar whose backward is the closed form; ``recorder(params,
    grads)``, if given, gets the gradients backward returns (as :func:`quadratic_penalty`'s does)."""
    if not (len(layers) == len(anchors) == len(a) == len(g)):
        raise ValueError("layers, anchors and the factors A and G must have the same length")
    params = [t for w, b in layers for t in (w, b) if t is not None]
    if params and is_sharded(params[0]):  # the closed form on the local shards (see penalty.py)
        rec = None if recorder is None else (lambda _shards, grads: recorder(params, grads))
        shards = [p.to_local() for p in params]
        return _KFACPenaltyFn.apply(float(scale), list(layers), list(anchors), list(a), list(g), rec, *shards)
    return _KFACPenaltyFn.apply(float(scale), list(layers), list(anchors), list(a), list(g), recorder, *params)
