r"""Synaptic Intelligence's path integral and importance (Zenke et al., 2017).

Each optimizer step adds to the path integral ω the product of the task loss's gradient g and the
step Δθ = θ_new − θ_old:

.. math:: \omega_i \mathrel{-}= g_i \, \Delta\theta_i .

At the end of a task, with Δ = θ − θ_start (θ_start the parameters at the previous consolidation),

.. math:: \Omega_i \leftarrow \Omega_i + \frac{\omega_i}{\Delta_i^2 + \xi},

clamped by ``clamp``: ``"cumulative"`` (the default, as the authors' code: Ω ← max(Ω + ω/(Δ²+ξ), 0)),
``"per_task"`` (each task's term clamped at 0) or ``None``. Then ω ← 0 and θ_start ← θ. The penalty
is c Σ Ω (θ − θ*)² (no ½, as in the paper).

Example:
    >>> import torch
    >>> from clreg.functional import si_importance_
    >>> omega_total = [torch.zeros(1)]
    >>> si_importance_(omega_total, [torch.tensor([2.0])], [torch.tensor([1.0])], xi=1.0)
    >>> omega_total[0].item()
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._sharding import local_all

__all__ = ["CLAMPS", "si_importance_", "si_path_update_"]

CLAMPS = ("cumulative", "per_task", None)


def si_path_update_(omega: Sequence[Tensor], grads: Sequence[Tensor], steps: Sequence[Tensor]) -> None:
    """ω −= g · Δθ in place (one fused pass; on the local shards of sharded tensors)."""
    with torch.no_grad():
        torch._foreach_addcmul_(local_all(omega), local_all(grads), local_all(steps), value=-1.0)


def si_importance_(
    importance: Sequence[Tensor],
    omega: Sequence[Tensor],
    delta: Sequence[Tensor],
    xi: float,
    clamp: str | None = "cumulative",
    weight: float = 1.0,
) -> None:
    """Ω ← Ω + w·ω/(Δ² + ξ) in place, clamped as ``clamp`` says (element-wise: sharded tensors shard by
    shard)."""
    if not xi > 0:
        raise ValueError(f"xi must be > 0, got {xi}")
    if clamp not in CLAMPS:
        raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
    with torch.no_grad():
        for big, w, d in zip(local_all(importance), local_all(omega), local_all(delta)):
            term = w.to(big.dtype) * weight / (d.to(big.dtype).square() + xi)
            if clamp == "per_task":
                term.clamp_(min=0.0)
            big.add_(term)
            if clamp == "cumulative":
                big.clamp_(min=0.0)
